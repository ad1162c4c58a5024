"""Regenerates jinja_cases.json: templates rendered by the real jinja2 in the environment transformers uses for chat
templates (ImmutableSandboxedEnvironment, trim_blocks, lstrip_blocks, loopcontrols, json.dumps-based tojson,
raise_exception). Run: python3 make_jinja_cases.py  (needs jinja2)."""
import json
import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.ext import loopcontrols
from jinja2.exceptions import TemplateError


def raise_exception(message):
    raise TemplateError(message)


def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
env.filters["tojson"] = tojson
env.globals["raise_exception"] = raise_exception

VARIABLES = {
    "xs": ["p", "q"],
    "messages": [
        {"role": "system", "content": "Be brief.\nOK"},
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": "Bye"},
    ],
}

TEMPLATES = [
    # whitespace handling
    "{% for x in xs %}\n    {{ x }}\n{% endfor %}",
    "  {%- if true %}\n  a\n  {%- endif %}\nb",
    "{% if true %}  \n  x{% endif %}",
    "a\n\n  {% if true %}b{% endif %}  \n",
    "{{ 'a' }}\n{% if true %}\n  {{ 'b' }}\n{% endif %}\n",
    "{%- for m in xs -%}\n{{ m }}\n{%- endfor -%}",
    "x {# c #}\n y",
    "{% raw %}\n  {{ a }}\n{% endraw %}\n",
    "\t{% if true %}x{% endif %}",
    "{% if true %}\r\nx\r\n{% endif %}",
    "a{%- if true %} b {% endif -%} c",
    "{% set x %}\n  inner\n{% endset %}[{{ x }}]",
    "\n{% if true %}\nx\n{% endif %}",
    "{% for i in range(3) %}{{ i }}{% if not loop.last %}, {% endif %}{% endfor %}",
    "a\n   {{- 'b' }}",
    "  {# comment #}  x",
    "{%+ if true %}\n{% endif %}",
    "line\n  {% if true -%}\n   x\n  {%- endif %}\n",
    "{{ 'a' }}{# x #}\n{{ 'b' }}",
    "{% for x in xs %}{{ x }}{% endfor %}   {% if true %}\n   y\n{% endif %}",
    "  {% raw %}  r  {% endraw %}\n  z",
    # values, filters, tests
    "{{ xs | tojson }} {{ xs[0] | tojson }} {{ 'a\\u00e9' | tojson }}",
    "{{ xs is sequence }}{{ 'x' ~ xs }}",
    "{% if xs %}{{ xs | length }}{% endif %}{{ xs[1:] }}{{ xs[:-1] }}{{ xs[-2:] }}",
    "{{ '%d items' % 3 }} {{ 10 / 4 }} {{ 10 // 4 }} {{ 2.0 * 3 }} {{ 1e3 }} {{ 0.1 + 0.2 }}",
    "{{ 'abc' | center(7) }}|{{ 'Hello World' | wordcount }}|{{ 'a b' | title }}|{{ 'aBc' | capitalize }}",
    "{% for a, b in [[1, 2], [3, 4]] %}{{ a + b }}{% endfor %}",
    "{{ none | default('x') }}|{{ none | default('x', true) }}|{{ false | string }}",
    "{% set d = {'b': 1, 'a': 2} %}{{ d | tojson }}",
    "{{ 'x' if 1 > 2 else 'y' if 2 > 1 else 'z' }}",
    "{{ [1, 2, 3] | map('string') | join('-') }}",
    "{{ 'a\\tb' | tojson }} {{ {'k': 'v'} | tojson(indent=4) }}",
    "{{ -2 ** 2 }} {{ (-2) ** 2 }} {{ 2 ** -1 }}",
    "{{ 'abc'[-1] }}{{ 'abc'[5] is defined }}",
    "{{ loop is defined }}{% for i in [1] %}{{ loop.previtem is defined }}{{ loop.nextitem is defined }}{% endfor %}",
    "{% macro f(a, b=2) %}{{ a }}-{{ b }}-{{ varargs }}{% endmacro %}{{ f(1) }} {{ f(1, 3, 4) }}",
    # chat-template idioms
    "{% for m in messages | reverse %}{{ m.role }}{% endfor %}",
    "{{ messages | tojson }}",
    "{% for i in range(messages | length - 1, -1, -1) %}{{ i }}{% endfor %}",
    "{% for m in messages %}{% if loop.index0 is divisibleby(2) %}E{% else %}O{% endif %}{% endfor %}",
    "{{ 'a' ~ undefined_var ~ 'b' }}",
    "{{ none.x is defined }}",
    "{{ messages[0].content.split(' ')[0] }}|{{ '\\n' in messages[0].content }}",
    "{{ messages[0]['content'] is string }}{{ messages is not string }}",
    "{% set ns = namespace(found=false) %}{% for m in messages %}{% if m.role == 'system' %}{% set ns.found = true %}{% endif %}{% endfor %}{{ ns.found }}",
    "{{ (messages | selectattr('role', 'equalto', 'user') | list | last).content }}",
    "{{ messages[1:] | map(attribute='role') | list }}",
    "{% for m in messages if m.role != 'system' %}{{ loop.index }}:{{ m.content }} {% endfor %}",
    "{{ 'b' < 'a' }}{{ 'B' < 'a' }}{{ [1, 2] < [1, 3] }}",
    "{{ messages[0].get('role') }}{{ messages[0].get('missing', 'dflt') }}",
    "{% if messages[0].role == 'system' %}{% set sys = messages[0].content %}{% set rest = messages[1:] %}{% else %}{% set rest = messages %}{% endif %}{{ sys is defined }}{{ rest | length }}",
    "{%- for message in messages %}\n    {%- if message.role == 'user' %}\n        {{- '[INST] ' + message.content + ' [/INST]' }}\n    {%- elif message.role == 'assistant' %}\n        {{- ' ' + message.content + '</s>' }}\n    {%- endif %}\n{%- endfor %}\n",
    "{{ messages | length > 2 and messages[2].role == 'assistant' }}",
    "{{ 'yes' if messages else 'no' }}{{ 'yes' if [] else 'no' }}",
    "{{ messages[0] }}",
    "{{ {'a': none, 'b': true} }}",
    "{% for k in {'x': 1, 'y': 2} %}{{ k }}{% endfor %}",
    "{{ 'Hi %s, you are %d' % ('Bob', 30) }}",
    "{{ '{} and {}'.format('a', 'b') }}",
    "{{ 'ab' in ['ab', 'c'] }}{{ 'x' not in 'abc' }}",
    "{{ 3 > 2 > 1 }}{{ 1 == 1 == 1 }}",
    "{{ '  a  '.lstrip() }}|{{ '  a  '.rstrip() }}|{{ 'a.b.c'.rsplit('.', 1) }}",
    "{{ [1, [2, 3]] | tojson }} {{ 1.5 | tojson }} {{ none | tojson }}",
    "{{ 'x' | list }} {{ 'abc' | first }} {{ 'abc' | last }}",
    "{{ messages | selectattr('role', 'in', ['user', 'assistant']) | list | length }}",
    "{% for m in messages %}{% set content = m.content %}{% if loop.first %}{% set content = 'FIRST ' + content %}{% endif %}{{ content }};{% endfor %}",
    "{{ (1, 2) }} {{ () }} {{ (1,) }} {{ {'a': 1}.items() | list }}",
]

cases = [{"template": t, "rendered": env.from_string(t).render(**VARIABLES)} for t in TEMPLATES]
with open("jinja_cases.json", "w", encoding="utf-8") as f:
    json.dump({"generator": f"jinja2 {jinja2.__version__}", "variables": VARIABLES, "cases": cases}, f, ensure_ascii=False, indent=1)
print(len(cases), "cases")
