"""Chat templates as the families ship them, through the server's own prompt path: Qwen3's
``enable_thinking`` arrives through ``chat_template_kwargs`` (as vLLM passes it), Gemma 2's
template refuses a system turn (a 400 naming messages), Gemma 3's folds it into the first user
turn. The templates are the shipped ones' relevant branches, written out here (no hub)."""

import pytest
from transformers import AutoTokenizer

from stepserve.errors import InvalidRequestError
from stepserve.server.config import ServerConfig
from stepserve.server.context import ServingContext
from stepserve.server.plan import plan_chat
from stepserve.server.schemas import ChatCompletionRequest

QWEN3 = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)
GEMMA2 = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}{{ raise_exception('System role not supported') }}"
    "{% endif %}"
    "{% for message in messages %}"
    "{{ '<start_of_turn>' + message['role'] + '\\n' + message['content'] | trim + '<end_of_turn>\\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{'<start_of_turn>model\\n'}}{% endif %}"
)
GEMMA3 = (
    "{{ bos_token }}{%- if messages[0]['role'] == 'system' -%}"
    "{%- set first_user_prefix = messages[0]['content'] + '\\n\\n' -%}"
    "{%- set loop_messages = messages[1:] -%}{%- else -%}{%- set first_user_prefix = '' -%}"
    "{%- set loop_messages = messages -%}{%- endif -%}"
    "{%- for message in loop_messages -%}"
    "{{ '<start_of_turn>' + message['role'] + '\\n' + (first_user_prefix if loop.first else '') "
    "+ message['content'] | trim + '<end_of_turn>\\n' }}{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{'<start_of_turn>model\\n'}}{%- endif -%}"
)
SYSTEM_AND_USER = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]


@pytest.fixture
def context(tiny_llama):
    def make(template: str) -> ServingContext:
        tokenizer = AutoTokenizer.from_pretrained(tiny_llama)
        tokenizer.chat_template = template
        return ServingContext(
            engine=None,
            tokenizer=tokenizer,
            model_name="tiny",
            max_model_len=512,
            vocab_size=320,
            config=ServerConfig(),
        )

    return make


def rendered(ctx, **body) -> str:
    request = ChatCompletionRequest(model="tiny", max_tokens=4, **body)
    return ctx.tokenizer.decode(list(plan_chat(ctx, request).inputs[0].token_ids))


def test_qwen3_enable_thinking_through_chat_template_kwargs(context):
    ctx = context(QWEN3)
    user = [{"role": "user", "content": "Hi"}]
    assert rendered(ctx, messages=user).endswith("<|im_start|>assistant\n")
    off = rendered(ctx, messages=user, chat_template_kwargs={"enable_thinking": False})
    assert off.endswith("<|im_start|>assistant\n<think>\n\n</think>\n\n")


def test_gemma2_refuses_a_system_turn_with_a_400(context):
    with pytest.raises(InvalidRequestError) as info:
        rendered(context(GEMMA2), messages=SYSTEM_AND_USER)
    assert info.value.param == "messages" and "System role not supported" in info.value.message


def test_gemma3_folds_the_system_turn_into_the_first_user_turn(context):
    text = rendered(context(GEMMA3), messages=SYSTEM_AND_USER)
    assert "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\n" in text


def test_template_kwargs_may_not_set_the_calls_own_arguments(context):
    with pytest.raises(InvalidRequestError) as info:
        rendered(context(QWEN3), messages=[{"role": "user", "content": "Hi"}], chat_template_kwargs={"tokenize": True})
    assert info.value.param == "chat_template_kwargs"
