"""Chat-template budgets that cannot be bypassed (issue 15, defect 3): each hostile template
fails fast with a TemplateError (a 400 from the server; a one-line KilnError for an engine's
own template), and templates written the way real ones are (namespace, loop, raise_exception,
strftime_now, tojson, range, slicing, '%' and format) still render."""

from __future__ import annotations

import time

import pytest

from kiln.checkpoint.chat_template import TemplateError, render_chat
from kiln.checkpoint.tokenizer import render_chat_template
from kiln.errors import KilnError

MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}]
BUDGET_S = 1.0

HOSTILE = [
    ("lipsum runs outside the time check", "{{ lipsum(40000, html=False, min=20, max=100) }}"),
    ("cycler is gone", "{{ cycler(1, 2).next() }}"),
    ("joiner is gone", "{% set j = joiner() %}{{ j() }}"),
    ("power of a power", "{{ ((10**1000)**1000)**10 }}"),
    ("big product of ints", "{% set x = 10**1200 %}{{ x * x * x * x }}"),
    ("doubling an int by addition", "{% set ns = namespace(x=1) %}{% for i in range(100000) %}"
                                    "{% set ns.x = ns.x + ns.x %}{% endfor %}{{ ns.x }}"),
    ("percent-format width", "{{ '%0300000000d' % 1 }}"),
    ("percent-format precision", "{{ '%.300000000f' % 1.5 }}"),
    ("percent-format star width", "{{ '%*d' % (300000000, 1) }}"),
    ("format filter width", "{{ '%0300000000d'|format(1) }}"),
    ("str.format width", "{{ '{:0300000000d}'.format(1) }}"),
    ("str.format nested width", "{{ '{:{w}}'.format('a', w=300000000) }}"),
    ("doubling a string with ~", "{% set ns = namespace(s='x') %}{% for i in range(40) %}"
                                 "{% set ns.s = ns.s ~ ns.s %}{% endfor %}{{ ns.s|length }}"),
    ("doubling a string with +", "{% set ns = namespace(s='x') %}{% for i in range(40) %}"
                                 "{% set ns.s = ns.s + ns.s %}{% endfor %}{{ ns.s|length }}"),
    ("block capture of a big loop", "{% set s = 'x' * 500000 %}{% set big %}{% for i in range(100000) %}"
                                    "{{ s }}{% endfor %}{% endset %}{{ big|length }}"),
    ("join of a big list", "{% set s = 'x' * 500000 %}{% set ns = namespace(l=[]) %}"
                           "{% for i in range(1000) %}{% set ns.l = ns.l + [s] %}{% endfor %}"
                           "{{ ns.l|join|length }}"),
    ("replace blow-up", "{% set s = 'a' * 100000 %}{{ s|replace('a', s)|length }}"),
    ("indent blow-up", "{% set s = '\n' * 100000 %}{{ s|indent(100000)|length }}"),
    ("center width", "{{ 'x'|center(10**9) }}"),
    ("tojson indent", "{{ messages|tojson(indent=100000) }}"),
    ("repeat a string", "{{ 'x' * 10**10 }}"),
    ("repeat a list", "{{ ([1] * 10**9)|length }}"),
    ("nested loops", "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"),
    ("huge range", "{% for i in range(10**12) %}{% endfor %}"),
    ("big output", "{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}"),
    ("mro escape", "{{ ''.__class__.__mro__[1].__subclasses__() }}"),
    ("globals escape", "{{ namespace.__init__.__globals__ }}"),
]


@pytest.mark.parametrize("template", [t for _, t in HOSTILE], ids=[n for n, _ in HOSTILE])
def test_hostile_template_fails_fast(template):
    started = time.monotonic()
    with pytest.raises(TemplateError):
        render_chat(template, MESSAGES, time_budget_s=BUDGET_S, max_chars=1 << 20)
    elapsed = time.monotonic() - started
    assert elapsed < 2 * BUDGET_S, f"took {elapsed:.2f} s"


def test_an_engine_template_gets_one_clear_line():
    with pytest.raises(KilnError, match="format width 300000000 is over the limit"):
        render_chat_template("{{ '%0300000000d' % 1 }}", MESSAGES)


# Written the way Llama-3.x, Qwen2.5, Mistral and SmolLM2 templates are (their constructs,
# not their text): every global and filter they use must keep working.
REALISTIC = """{%- set ns = namespace(system='', found=false) -%}
{%- if messages[0]['role'] == 'system' -%}{%- set ns.system = messages[0]['content'] -%}
{%- set loop_messages = messages[1:] -%}{%- else -%}{%- set loop_messages = messages -%}{%- endif -%}
{{- bos_token }}<|sys|>{{ ns.system }} {{ strftime_now('%d %b %Y')|length > 0 }}
{%- for message in loop_messages -%}
{%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
{{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') -}}
{%- endif -%}
<|{{ message['role'] }}|>{{ message['content'] | trim }}{{ eos_token }}
{%- endfor -%}
{%- for i in range(2) %}{{ i }}{% endfor -%}
{{ '%02d' % 7 }}{{ '{:>3}'.format('x') }}{{ {'a': 1}|tojson }}{{ ['a', 'b']|join(', ') }}
{%- if add_generation_prompt %}<|assistant|>{% endif -%}"""


def test_realistic_templates_still_render():
    text = render_chat(REALISTIC, MESSAGES, special_tokens={"bos_token": "<s>", "eos_token": "</s>"})
    assert text.startswith("<s><|sys|>Be brief. True")
    assert "<|user|>hi</s>" in text and text.endswith("<|assistant|>")
    assert "01" in text and "07" in text and "  x" in text and '{"a": 1}' in text and "a, b" in text
    with pytest.raises(TemplateError, match="alternate"):
        render_chat(REALISTIC, [{"role": "assistant", "content": "x"}])


def test_the_smollm2_template_renders(llm_engine):
    from kiln.checkpoint.tokenizer import chat_template_of, special_tokens_of

    template = chat_template_of(llm_engine.tokenizer, llm_engine.engine_info.tokenizer_dir)
    text = render_chat(template, MESSAGES, special_tokens=special_tokens_of(llm_engine.tokenizer))
    assert "<|im_start|>user\nhi<|im_end|>" in text
