# Tab completion for moe-rag-inject in bash (zsh: run `autoload -U +X bashcompinit && bashcompinit` first).
#   source tools/completion/moe-rag-inject.bash      # this shell; add the line to ~/.bashrc to keep it
# It asks the program itself, through System.CommandLine's [suggest:POSITION] directive, so the completions (commands,
# options, the values of --rag-mode, --device, ...) are always those of the build being run. Works for ./moe-rag-inject,
# moe-rag-inject on the PATH and the published single-file executable alike.
_moe_rag_inject() {
  local program="${COMP_WORDS[0]}" current="${COMP_WORDS[COMP_CWORD]}"
  # The command line up to the cursor, without the program's own word: what the [suggest] directive parses.
  local line="${COMP_LINE:0:COMP_POINT}"
  line="${line#*"$program"}"
  line="${line#"${line%%[![:space:]]*}"}"
  local IFS=$'\n'
  local suggestions
  suggestions="$("$program" "[suggest:${#line}]" "$line" 2>/dev/null)" || return 0
  COMPREPLY=($(compgen -W "$suggestions" -- "$current"))
}
complete -o default -F _moe_rag_inject moe-rag-inject
