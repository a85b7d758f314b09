"""Chat templates (minipipe.chat): rendered the way Hugging Face's apply_chat_template renders them.

The slow test asks the real SmolLM2-135M-Instruct (where `minipipe pull smollm2-135m` has put it)
for the capital of France through the chat template and minipipe's greedy decoding.
"""

from __future__ import annotations

import json
import sys

import pytest

from minipipe.chat import ChatTemplateError, chat_prompt, render_chat, select_template
from minipipe.errors import InputError
from minipipe.synthetic import make_random_checkpoint

# SmolLM2-135M-Instruct's template (from its GGUF metadata / tokenizer_config.json)
SMOLLM2 = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
USER = [{"role": "user", "content": "What is the capital of France?"}]


def test_smollm2_template_default_system_and_generation_prompt():
    assert render_chat(SMOLLM2, USER) == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n")


def test_own_system_message_and_no_generation_prompt():
    messages = [{"role": "system", "content": "Be brief."}, *USER, {"role": "assistant", "content": "Paris."}]
    assert render_chat(SMOLLM2, messages, add_generation_prompt=False) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\nParis.<|im_end|>\n")


def test_hf_conventions():
    """trim_blocks/lstrip_blocks, bos_token/eos_token, loop controls, tojson keeping unicode."""
    template = ("{{ bos_token }}\n"
                "{% for m in messages %}\n"
                "    {% if m['role'] == 'skip' %}{% continue %}{% endif %}\n"
                "[{{ m['role'] }}] {{ m['content'] | tojson }}{{ eos_token }}\n"
                "{% endfor %}\n"
                "{% if add_generation_prompt %}[assistant]{% endif %}")
    messages = [{"role": "user", "content": "café"}, {"role": "skip", "content": "x"}]
    out = render_chat(template, messages, bos_token="<s>", eos_token="</s>")
    assert out == '<s>\n[user] "café"</s>\n[assistant]'


def test_raise_exception_and_bad_templates():
    strict = ("{% if messages[0]['role'] != 'user' %}"
              "{{ raise_exception('first message must be from the user') }}{% endif %}ok")
    assert render_chat(strict, USER) == "ok"
    with pytest.raises(ChatTemplateError, match="rejected the conversation: first message must be from the user"):
        render_chat(strict, [{"role": "assistant", "content": "hi"}])
    with pytest.raises(ChatTemplateError, match="does not parse"):
        render_chat("{% for m in messages %}", USER)
    with pytest.raises(ChatTemplateError, match="no chat template"):
        render_chat(None, USER)
    with pytest.raises(InputError, match="role and a content"):
        render_chat(SMOLLM2, [{"content": "no role"}])


def test_named_templates():
    named = [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": "plain"}]
    assert select_template(named) == "plain" and select_template(named, "tool_use") == "tools"
    with pytest.raises(ChatTemplateError, match="no chat template named 'rag'"):
        select_template(named, "rag")


def test_chat_prompt_from_a_checkpoint(tmp_path):
    from minipipe.tokenizer import Tokenizer

    d = make_random_checkpoint(tmp_path / "m", seed=0, vocab_size=16)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    with pytest.raises(ChatTemplateError, match="drop --chat"):
        chat_prompt(Tokenizer(d), "hi")
    cfg["chat_template"] = "{{ bos_token }}{% for m in messages %}{{ m['content'] }}{% endfor %}{{ eos_token }}"
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert chat_prompt(Tokenizer(d), "hi", system="sys ") == "<s>sys hi</s>"


def test_missing_jinja2_is_one_clear_line(monkeypatch):
    from minipipe import chat

    chat._compile.cache_clear()
    monkeypatch.setitem(sys.modules, "jinja2.sandbox", None)
    try:
        with pytest.raises(ChatTemplateError, match="pip install jinja2"):
            render_chat("a different template {{ 1 }}", USER)
    finally:
        chat._compile.cache_clear()


@pytest.mark.slow
def test_smollm2_says_paris():
    """`minipipe generate --model smollm2-135m --chat "What is the capital of France?"`, by hand."""
    from minipipe.config import load_config
    from minipipe.greedy import generate_greedy
    from minipipe.model import load_stage
    from minipipe.pull import is_complete, model_dir
    from minipipe.tokenizer import Tokenizer

    d = model_dir("smollm2-135m")
    if not is_complete(d):
        pytest.skip(f"SmolLM2 is not pulled ({d}); run `minipipe pull smollm2-135m`")
    tok = Tokenizer(d, load_config(d).eos_ids)
    ids = tok.encode(chat_prompt(tok, "What is the capital of France?"))
    assert ids[:3] == [1, 9690, 198] and ids[-4:] == [1, 520, 9531, 198]  # <|im_start|>system\n ... assistant\n
    result = generate_greedy(load_stage(d), ids, 32, tok.eos_ids)
    assert result.stop_reason == "eos"
    assert tok.decode(result.tokens) == "The capital of France is Paris."
