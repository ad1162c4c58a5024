using MoeRagInject.Model.Tokenization;

namespace MoeRagInject.Model.Tests;

/// <summary>The Jinja subset, with expected outputs derived by hand from Jinja2's documented semantics.</summary>
public class JinjaTemplateTests
{
    private static readonly List<ChatMessage> SysUser = [new("system", "sys"), new("user", "hi")];

    private static string R(string template, Dictionary<string, object?>? vars = null, JinjaOptions? options = null) =>
        JinjaTemplate.Parse(template, options).Render(vars ?? []);

    private static Dictionary<string, object?> V(params (string Name, object? Value)[] items) =>
        items.ToDictionary(i => i.Name, i => i.Value);

    [Theory]
    [InlineData("{{ 'a' + \"b\" }}", "ab")]
    [InlineData("{{ 1 + 2 * 3 }}", "7")]
    [InlineData("{{ 7 // 2 }}{{ 7 % 3 }}{{ -7 // 2 }}{{ -7 % 3 }}", "31-42")]
    [InlineData("{{ 7 / 2 }} {{ 4 / 2 }}", "3.5 2.0")]
    [InlineData("{{ true }} {{ none }} {{ missing }}|", "True None |")]
    [InlineData("{{ 'x' ~ 1 ~ none }}", "x1None")]
    [InlineData("{{ 2 ** 10 }} {{ 'ab' * 2 }}", "1024 abab")]
    [InlineData("{{ [1, 'a', none, true, 1.5] }}", "[1, 'a', None, True, 1.5]")]
    [InlineData("{{ {'a': {'b': 1}} }}", "{'a': {'b': 1}}")]
    [InlineData("{{ 'a\\nb' }}|{{ \"it's\" }}|{{ 't\\tx' }}", "a\nb|it's|t\tx")]
    [InlineData("{{ 'a' 'b' }}", "ab")]
    [InlineData("{{ (1, 2) }} {{ () }} {{ (1,) }} {{ {'a': 1}.items() | list }}", "(1, 2) () (1,) [('a', 1)]")]
    public void Expressions(string template, string expected) => Assert.Equal(expected, R(template));

    [Theory]
    [InlineData("{{ 1 < 2 < 3 }} {{ 3 < 2 < 4 }}", "True False")]
    [InlineData("{{ 'b' in 'abc' }} {{ 2 not in [1, 3] }} {{ 'k' in {'k': 1} }}", "True True True")]
    [InlineData("{{ 1 == 1.0 }} {{ 'a' != 'a' }} {{ 2 >= 2 }}", "True False True")]
    [InlineData("{{ none or 'x' }} {{ 0 and 1 }} {{ not '' }} {{ not 1 == 1 }}", "x 0 True False")]
    [InlineData("{{ 'y' if x else 'n' }}|{{ 'y' if x }}|", "n||")]
    public void ComparisonsAndLogic(string template, string expected) => Assert.Equal(expected, R(template, V(("x", 0))));

    [Fact]
    public void AttributesItemsAndSlices()
    {
        const string t = "{{ messages[0]['role'] }} {{ messages[0].content }} {{ messages[-1].role }} {{ messages[1:] | length }} " +
                         "{{ 'hello'[1:3] }} {{ 'hello'[::-1] }} {{ [1, 2, 3, 4][::2] }} {{ messages[5] is defined }} {{ messages[0].nope is defined }}";
        Assert.Equal("system sys user 1 el olleh [1, 3] False False", R(t, V(("messages", SysUser))));
    }

    [Theory]
    [InlineData(1, "one")]
    [InlineData(2, "two")]
    [InlineData(3, "many")]
    public void IfElifElse(int x, string expected) =>
        Assert.Equal(expected, R("{% if x == 1 %}one{% elif x == 2 %}two{% else %}many{% endif %}", V(("x", x))));

    [Theory]
    [InlineData("{% for i in items %}{{ loop.index0 }}{{ loop.index }}{{ loop.first }}{{ loop.last }}{{ loop.length }};{% endfor %}",
        "01TrueFalse2;12FalseTrue2;")]
    [InlineData("{% for i in items %}{{ loop.revindex }}{{ loop.revindex0 }}{% endfor %}", "2110")]
    [InlineData("{% for i in [] %}x{% else %}empty{% endfor %}", "empty")]
    [InlineData("{% for i in range(6) if i is even %}{{ i }}{{ loop.length }}{% endfor %}", "032343")]
    [InlineData("{% for k, v in {'a': 1, 'b': 2}.items() %}{{ k }}={{ v }},{% endfor %}", "a=1,b=2,")]
    [InlineData("{% for k, v in {'a': 1} | items %}{{ k }}{{ v }}{% endfor %}", "a1")]
    [InlineData("{% for i in range(10) %}{% if i == 2 %}{% continue %}{% endif %}{% if i == 4 %}{% break %}{% endif %}{{ i }}{% endfor %}", "013")]
    [InlineData("{% for i in range(3) %}{{ loop.cycle('a', 'b') }}{% endfor %}", "aba")]
    [InlineData("{% for i in range(1, 7, 2) %}{{ i }}{% endfor %}", "135")]
    [InlineData("{% for c in 'ab' %}[{{ c }}]{% endfor %}", "[a][b]")]
    [InlineData("{% for i in items %}{% for j in items %}{{ loop.index }}{% endfor %}{{ loop.index }}|{% endfor %}", "121|122|")]
    public void ForLoops(string template, string expected) =>
        Assert.Equal(expected, R(template, V(("items", new List<string> { "a", "b" }))));

    [Theory]
    [InlineData("{% set x = 1 %}{% for i in [1] %}{% set x = 2 %}{{ x }}{% endfor %}{{ x }}", "21")]
    [InlineData("{% set ns = namespace(n=0) %}{% for i in [1, 2, 3] %}{% set ns.n = ns.n + i %}{% endfor %}{{ ns.n }}", "6")]
    [InlineData("{% if true %}{% set y = 'v' %}{% endif %}{{ y }}", "v")]
    [InlineData("{% set s %}a{{ 1 }}b{% endset %}[{{ s }}]", "[a1b]")]
    [InlineData("{% set a = [1, 2] + [3] %}{{ a }}", "[1, 2, 3]")]
    [InlineData("{% for i in [1, 2] %}{% if i == 1 %}{% set z = 'one' %}{% endif %}{{ z }}|{% endfor %}", "one||")]
    public void SetAndScoping(string template, string expected) => Assert.Equal(expected, R(template));

    [Theory]
    [InlineData("a  {{- 'b' -}}  c", "abc")]
    [InlineData("a\n{%- if true -%}\n  b\n{%- endif -%}\nc", "abc")]
    [InlineData("{% if true %}\nyes\n{% endif %}\nafter", "yes\nafter")]
    [InlineData("  {% if true %}x{% endif %}", "x")]
    [InlineData("a\n    {% if true %}\n    b\n    {% endif %}\nc", "a\n    b\nc")]
    [InlineData("  {{ 'x' }}", "  x")]
    [InlineData("  {%+ if true %}x{% endif %}", "  x")]
    [InlineData("{% if true +%}\nx{% endif %}", "\nx")]
    [InlineData("a{# comment #}b", "ab")]
    [InlineData("a\n  {# c #}\nb", "a\nb")]
    [InlineData("a {#- c -#} b", "ab")]
    [InlineData("x\n", "x")]
    [InlineData("x\n\n", "x\n")]
    [InlineData("{% raw %}{{ x }}{% endraw %}", "{{ x }}")]
    [InlineData("a {% if true %} b {% endif %} c", "a  b  c")]
    public void WhitespaceControlWithTrimAndLstripBlocks(string template, string expected) => Assert.Equal(expected, R(template));

    [Fact]
    public void WhitespaceWithoutTrimAndLstripBlocks()
    {
        var options = new JinjaOptions { TrimBlocks = false, LStripBlocks = false, KeepTrailingNewline = true };
        Assert.Equal("\nyes\n\n", R("{% if true %}\nyes\n{% endif %}\n", null, options));
        Assert.Equal("  x", R("  {% if true %}x{% endif %}", null, options));
    }

    [Fact]
    public void IndentedMultiLineTemplate()
    {
        const string t = "{% for message in messages %}\n  {% if message.role == 'user' %}\nU: {{ message.content }}\n  {% else %}\nA: {{ message.content }}\n  {% endif %}\n{% endfor %}\n";
        Assert.Equal("U: hi\nA: yo\n", R(t, V(("messages", new List<ChatMessage> { new("user", "hi"), new("assistant", "yo") }))));
    }

    [Theory]
    [InlineData("{{ '  x  ' | trim }}|{{ 'xxaxx' | trim('x') }}", "x|a")]
    [InlineData("{{ [1, 2, 3] | length }} {{ 'abc' | count }} {{ missing | length }}", "3 3 0")]
    [InlineData("{{ 'aB' | upper }}{{ 'aB' | lower }} {{ 'abc' | capitalize }} {{ 'hello world' | title }}", "ABab Abc Hello World")]
    [InlineData("{{ {'a': [1, 'x', none, true, 2.5]} | tojson }}", "{\"a\": [1, \"x\", null, true, 2.5]}")]
    [InlineData("{{ 'é\"\\n<' | tojson }}", "\"é\\\"\\n<\"")]
    [InlineData("{{ {'a': 1, 'b': [1, 2]} | tojson(indent=2) }}", "{\n  \"a\": 1,\n  \"b\": [\n    1,\n    2\n  ]\n}")]
    [InlineData("{{ [1, 2] | join(', ') }}|{{ missing | default('d') }}|{{ '' | default('e', true) }}|{{ 'v' | d('x') }}", "1, 2|d|e|v")]
    [InlineData("{{ 'a-b-c' | replace('-', '+') }} {{ [3, 1, 2] | sort | first }}{{ [3, 1, 2] | last }} {{ [3, 1, 2] | sort(reverse=true) }}", "a+b+c 12 [3, 2, 1]")]
    [InlineData("{{ 5 | string + 'x' }} {{ '42' | int + 1 }} {{ 'z' | int }} {{ '2.5' | float }} {{ -3 | abs }}", "5x 43 0 2.5 3")]
    [InlineData("{{ [1, 2, 2, 3] | unique | list }} {{ [1, 2] | reverse | list }} {{ 'ab' | reverse }} {{ [1, 2, 3] | sum }}", "[1, 2, 3] [2, 1] ba 6")]
    [InlineData("{{ 'a\nb' | indent(2) }}|{{ 'a\nb' | indent(2, true) }}", "a\n  b|  a\n  b")]
    [InlineData("{{ '<&>' | e }} {{ [1, 2, 3] | min }}{{ [1, 2, 3] | max }}", "&lt;&amp;&gt; 13")]
    [InlineData("{{ '%s-%d' | format('a', 3) }} {{ '%s!' % 'hi' }}", "a-3 hi!")]
    public void Filters(string template, string expected) => Assert.Equal(expected, R(template));

    [Fact]
    public void SelectAttrAndMap()
    {
        var messages = new List<ChatMessage> { new("system", "s"), new("user", "u1"), new("assistant", "a"), new("user", "u2") };
        Assert.Equal("['u1', 'u2'] 2 ['s', 'a'] system,user,assistant,user",
            R("{{ messages | selectattr('role', 'equalto', 'user') | map(attribute='content') | list }} " +
              "{{ messages | selectattr('role', '==', 'user') | list | length }} " +
              "{{ messages | rejectattr('role', 'eq', 'user') | map(attribute='content') | list }} " +
              "{{ messages | map(attribute='role') | join(',') }}", V(("messages", messages))));
        Assert.Equal("['A', 'B']", R("{{ ['a', 'b'] | map('upper') | list }}"));
        Assert.Equal("[2, 4]", R("{{ [1, 2, 3, 4] | select('even') | list }}"));
    }

    [Fact]
    public void Tests()
    {
        Assert.Equal("True False True True True True True False True",
            R("{{ x is defined }} {{ y is defined }} {{ none is none }} {{ 'a' is string }} {{ 3 is odd }} " +
              "{{ 4 is divisibleby 2 }} {{ x is not none }} {{ x is mapping }} {{ {} is mapping }}", V(("x", 1))));
        Assert.Equal("True True False True", R("{{ 1 is number }} {{ [1] is iterable }} {{ 1 is string }} {{ 'a' is lower }}"));
        Assert.Equal("True", R("{{ 'a' is in ['a', 'b'] }}"));
    }

    [Fact]
    public void MethodsOfStringsDictsAndLists()
    {
        Assert.Equal("hi|['a', 'b']|True|z|1|x-y|['a', 'b c']|abc|HI|False",
            R("{{ '  hi  '.strip() }}|{{ 'a,b'.split(',') }}|{{ 'Hello'.startswith('He') }}|{{ {'a': 1}.get('b', 'z') }}|" +
              "{{ {'a': 1}.get('a') }}|{{ '-'.join(['x', 'y']) }}|{{ 'a b c'.split(' ', 1) }}|{{ 'xabcx'.strip('x') }}|{{ 'hi'.upper() }}|" +
              "{{ 'ab'.endswith(('x', 'y')) }}"));
        Assert.Equal("['a', 'b'] [1, 2]", R("{{ d.keys() | list }} {{ d.values() | list }}",
            V(("d", new Dictionary<string, object?> { ["a"] = 1, ["b"] = 2 }))));
    }

    [Fact]
    public void Macros()
    {
        Assert.Equal("Hi Bob! Hi Al?",
            R("{% macro greet(name, punct='!') %}Hi {{ name }}{{ punct }}{% endmacro %}{{ greet('Bob') }} {{ greet('Al', punct='?') }}"));
    }

    [Fact]
    public void RaiseExceptionCarriesTheTemplatesMessage()
    {
        var ex = Assert.Throws<JinjaException>(() => R("{% if true %}{{ raise_exception('bad ' + 'input') }}{% endif %}"));
        Assert.Equal("bad input", ex.Message);
        Assert.True(ex.RaisedByTemplate);
    }

    [Theory]
    [InlineData("{{ x | nofilter }}", "no filter named 'nofilter'")]
    [InlineData("{{ x is notatest }}", "no test named 'notatest'")]
    [InlineData("{% if x %}open", "{% endif %}")]
    [InlineData("{% include 'other' %}", "'include'")]
    [InlineData("{% endfor %}", "unexpected {% endfor %}")]
    [InlineData("{{ 1 + }}", "expected an expression")]
    [InlineData("{{ 'abc }}", "unterminated string")]
    [InlineData("{{ x ", "unclosed tag")]
    [InlineData("{# x ", "unclosed comment")]
    [InlineData("{{ missing.attr }}", "'missing' is undefined")]
    [InlineData("{{ 'a' + 1 }}", "unsupported operand type(s) for +: 'str' and 'int'")]
    [InlineData("{% for i in 5 %}{% endfor %}", "'int' object is not iterable")]
    [InlineData("{% break %}", "'break' outside of a for loop")]
    [InlineData("{{ 1 // 0 }}", "division or modulo by zero")]
    [InlineData("{{ 1 2 }}", "unexpected '2'")]
    [InlineData("{% set x.y = 1 %}", "non-namespace")]
    [InlineData("{{ x() }}", "'x' is undefined")]
    public void ErrorsNameWhatIsWrong(string template, string expectedFragment)
    {
        var ex = Assert.Throws<JinjaException>(() => R(template));
        Assert.Contains(expectedFragment, ex.Message, StringComparison.Ordinal);
        Assert.Contains("chat template", ex.Message, StringComparison.Ordinal);
        Assert.False(ex.RaisedByTemplate);
    }

    [Fact]
    public void ErrorsNameTheLine()
    {
        var ex = Assert.Throws<JinjaException>(() => R("line one\n{% if true %}\n{{ x | nope }}{% endif %}"));
        Assert.Contains("line 3", ex.Message, StringComparison.Ordinal);
        var custom = Assert.Throws<JinjaException>(() => R("{{ x | nope }}", null, new JinjaOptions { Name = "my.jinja" }));
        Assert.StartsWith("my.jinja, line 1:", custom.Message, StringComparison.Ordinal);
    }

    [Fact]
    public void GlobalsAndClrValues()
    {
        Assert.Equal(DateTime.Now.Year.ToString(System.Globalization.CultureInfo.InvariantCulture), R("{{ strftime_now('%Y') }}"));
        Assert.Equal("[0, 1, 2]", R("{{ range(3) | list }}"));
        var vars = V(("n", 3), ("f", 0.5f), ("list", new[] { "a", "b" }), ("map", new Dictionary<string, int> { ["k"] = 7 }), ("flag", false));
        Assert.Equal("3 0.5 ['a', 'b'] 7 False", R("{{ n }} {{ f }} {{ list }} {{ map.k }} {{ flag }}", vars));
    }

    // ------------------------------------------------------------ real chat templates

    private const string MistralV01 =
        "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}" +
        "{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}" +
        "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{% elif message['role'] == 'assistant' %}" +
        "{{ message['content'] + eos_token}}{% else %}{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}";

    private const string ChatMl =
        "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n'}}{% endfor %}" +
        "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";

    private const string Llama2 =
        "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}{% set system_message = messages[0]['content'] %}" +
        "{% else %}{% set loop_messages = messages %}{% set system_message = false %}{% endif %}{% for message in loop_messages %}" +
        "{% if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}{{ raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}{% endif %}" +
        "{% if loop.index0 == 0 and system_message != false %}{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}" +
        "{% else %}{% set content = message['content'] %}{% endif %}{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}" +
        "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}{% endif %}{% endfor %}";

    private static ChatMessage M(string role, string content) => new(role, content);

    private static Dictionary<string, object?> Chat(bool addGenerationPrompt, params ChatMessage[] messages) =>
        V(("messages", messages.ToList()), ("bos_token", "<s>"), ("eos_token", "</s>"), ("add_generation_prompt", addGenerationPrompt));

    [Fact]
    public void MistralTemplate()
    {
        Assert.Equal("<s>[INST] Hi [/INST]Hello</s>[INST] Bye [/INST]",
            R(MistralV01, Chat(true, M("user", "Hi"), M("assistant", "Hello"), M("user", "Bye"))));
        var ex = Assert.Throws<JinjaException>(() => R(MistralV01, Chat(true, M("system", "S"), M("user", "Hi"))));
        Assert.Equal("Conversation roles must alternate user/assistant/user/assistant/...", ex.Message);
    }

    [Fact]
    public void ChatMlTemplate()
    {
        Assert.Equal("<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nU<|im_end|>\n<|im_start|>assistant\n",
            R(ChatMl, Chat(true, M("system", "S"), M("user", "U"))));
        Assert.Equal("<|im_start|>user\nU<|im_end|>\n", R(ChatMl, Chat(false, M("user", "U"))));
    }

    [Fact]
    public void Llama2Template()
    {
        Assert.Equal("<s>[INST] <<SYS>>\nS\n<</SYS>>\n\n U [/INST] A </s>",
            R(Llama2, Chat(false, M("system", "S"), M("user", " U "), M("assistant", "A"))));
        Assert.Equal("<s>[INST] U [/INST]", R(Llama2, Chat(true, M("user", "U"))));
    }

    [Fact]
    public void NamespaceBasedTemplateWithToolsNone()
    {
        const string t = """
            {%- set ns = namespace(last_user=-1) %}
            {%- for m in messages %}
                {%- if m.role == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}
            {%- endfor %}
            {%- if tools is not none and tools is defined %}TOOLS{% endif %}
            {%- for m in messages %}
                {%- if loop.index0 == ns.last_user %}[LAST]{% endif %}
                {{- m.content }}
            {%- endfor %}
            """;
        var vars = Chat(false, M("user", "a"), M("assistant", "b"), M("user", "c"), M("assistant", "d"));
        vars["tools"] = null;
        Assert.Equal("ab[LAST]cd", R(t, vars));
    }
}
