# ruff: noqa: E501
# (the templates below are verbatim copies, long lines included)
"""Assistant-only masking with the chat templates of real model families (Llama 3 / 3.1 / 3.2, Qwen2.5, Qwen3,
Mistral v0.3): exactly each assistant turn's content and end token is labelled, the eval-time generation prompt is the
training row's prefix before the answer, and DPO's chat prompt is that same prefix.

The templates are copies of the ones the families ship in tokenizer_config.json (tool-calling branches included, so
the code paths a plain conversation takes are the real ones). The tokenizers are small byte-level BPEs trained here,
offline, on the GPT-4-style split Llama 3 and Qwen2 use, with each family's special tokens.
"""

from __future__ import annotations

import datetime

import pytest
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from distributed_pt.data.io import DataError, Row
from distributed_pt.data.preference import encode_pair
from distributed_pt.data.sft import IGNORE_INDEX, encode_prompt, encode_row, turn_end

# meta-llama/Meta-Llama-3-8B-Instruct
LLAMA3 = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}{% set content = '<|start_header_id|>' + "
    "message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}{% if add_generation_prompt %}"
    "{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}{% endif %}"
)

# meta-llama/Llama-3.1-8B-Instruct: a system turn is always written, with "Cutting Knowledge Date" and a date.
LLAMA31 = r"""{{- bos_token }}
{%- if custom_tools is defined %}
    {%- set tools = custom_tools %}
{%- endif %}
{%- if not tools_in_user_message is defined %}
    {%- set tools_in_user_message = true %}
{%- endif %}
{%- if not date_string is defined %}
    {%- set date_string = "26 Jul 2024" %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}

{#- This block extracts the system message, so we can slot it into the right place. #}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content']|trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}

{#- System message + builtin tools #}
{{- "<|start_header_id|>system<|end_header_id|>\n\n" }}
{%- if builtin_tools is defined or tools is not none %}
    {{- "Environment: ipython\n" }}
{%- endif %}
{%- if builtin_tools is defined %}
    {{- "Tools: " + builtin_tools | reject('equalto', 'code_interpreter') | join(", ") + "\n\n"}}
{%- endif %}
{{- "Cutting Knowledge Date: December 2023\n" }}
{{- "Today Date: " + date_string + "\n\n" }}
{%- if tools is not none and not tools_in_user_message %}
    {{- "You have access to the following functions. To call a function, please respond with JSON for a function call." }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}

{#- Custom tools are passed in a user message with some extra guidance #}
{%- if tools_in_user_message and not tools is none %}
    {#- Extract the first user message so we can plug it in here #}
    {%- if messages | length != 0 %}
        {%- set first_user_message = messages[0]['content']|trim %}
        {%- set messages = messages[1:] %}
    {%- else %}
        {{- raise_exception("Cannot put tools in the first user message when there's no first user message!") }}
{%- endif %}
    {{- '<|start_header_id|>user<|end_header_id|>\n\n' -}}
    {{- "Given the following functions, please respond with a JSON for a function call " }}
    {{- "with its proper arguments that best answers the given prompt.\n\n" }}
    {{- 'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.' }}
    {{- "Do not use variables.\n\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\n\n" }}
    {%- endfor %}
    {{- first_user_message + "<|eot_id|>"}}
{%- endif %}

{%- for message in messages %}
    {%- if not (message.role == 'ipython' or message.role == 'tool' or 'tool_calls' in message) %}
        {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'+ message['content'] | trim + '<|eot_id|>' }}
    {%- elif 'tool_calls' in message %}
        {%- if not message.tool_calls|length == 1 %}
            {{- raise_exception("This model only supports single tool-calls at once!") }}
        {%- endif %}
        {%- set tool_call = message.tool_calls[0].function %}
        {%- if builtin_tools is defined and tool_call.name in builtin_tools %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- "<|python_tag|>" + tool_call.name + ".call(" }}
            {%- for arg_name, arg_val in tool_call.arguments | items %}
                {{- arg_name + '="' + arg_val + '"' }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- endif %}
                {%- endfor %}
            {{- ")" }}
        {%- else  %}
            {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}
            {{- '{"name": "' + tool_call.name + '", ' }}
            {{- '"parameters": ' }}
            {{- tool_call.arguments | tojson }}
            {{- "}" }}
        {%- endif %}
        {%- if builtin_tools is defined %}
            {#- This means we're in ipython mode #}
            {{- "<|eom_id|>" }}
        {%- else %}
            {{- "<|eot_id|>" }}
        {%- endif %}
    {%- elif message.role == "tool" or message.role == "ipython" %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\n\n" }}
        {%- if message.content is mapping or message.content is iterable %}
            {{- message.content | tojson }}
        {%- else %}
            {{- message.content }}
        {%- endif %}
        {{- "<|eot_id|>" }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

# meta-llama/Llama-3.2-1B-Instruct dates its default system turn with the day of rendering (transformers' strftime_now);
# on a conversation without tools that is its only difference from 3.1's template.
LLAMA32 = LLAMA31.replace(
    '{%- set date_string = "26 Jul 2024" %}',
    '{%- if strftime_now is defined %}\n        {%- set date_string = strftime_now("%d %b %Y") %}\n    {%- else %}\n'
    '        {%- set date_string = "26 Jul 2024" %}\n    {%- endif %}',
)

# Qwen/Qwen2.5-7B-Instruct: ChatML; "You are Qwen, ..." when there is no system message.
QWEN25 = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0]['role'] == 'system' %}
        {{- messages[0]['content'] }}
    {%- else %}
        {{- 'You are Qwen, created by Alibaba Cloud. You are a helpful assistant.' }}
    {%- endif %}
    {{- "\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0]['role'] == 'system' %}
        {{- '<|im_start|>system\n' + messages[0]['content'] + '<|im_end|>\n' }}
    {%- else %}
        {{- '<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- for message in messages %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) or (message.role == "assistant" and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\n' + message.content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role }}
        {%- if message.content %}
            {{- '\n' + message.content }}
        {%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- if tool_call.function is defined %}
                {%- set tool_call = tool_call.function %}
            {%- endif %}
            {{- '\n<tool_call>\n{"name": "' }}
            {{- tool_call.name }}
            {{- '", "arguments": ' }}
            {{- tool_call.arguments | tojson }}
            {{- '}\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if (loop.index0 == 0) or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- message.content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
"""

# Qwen/Qwen3-8B: ChatML whose last assistant turn (after the last user message) gets a "<think>...</think>" block;
# earlier turns are written without theirs. So a turn renders differently when it ends the conversation.
QWEN3 = r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {{- messages[0].content + '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' + messages[0].content + '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set ns = namespace(multi_step_tool=true, last_query_index=messages|length - 1) %}
{%- for message in messages[::-1] %}
    {%- set index = (messages|length - 1) - loop.index0 %}
    {%- if ns.multi_step_tool and message.role == "user" and message.content is string and not(message.content.startswith('<tool_response>') and message.content.endswith('</tool_response>')) %}
        {%- set ns.multi_step_tool = false %}
        {%- set ns.last_query_index = index %}
    {%- endif %}
{%- endfor %}
{%- for message in messages %}
    {%- if message.content is string %}
        {%- set content = message.content %}
    {%- else %}
        {%- set content = '' %}
    {%- endif %}
    {%- if (message.role == "user") or (message.role == "system" and not loop.first) %}
        {{- '<|im_start|>' + message.role + '\n' + content + '<|im_end|>' + '\n' }}
    {%- elif message.role == "assistant" %}
        {%- set reasoning_content = '' %}
        {%- if message.reasoning_content is string %}
            {%- set reasoning_content = message.reasoning_content %}
        {%- else %}
            {%- if '</think>' in content %}
                {%- set reasoning_content = content.split('</think>')[0].rstrip('\n').split('<think>')[-1].lstrip('\n') %}
                {%- set content = content.split('</think>')[-1].lstrip('\n') %}
            {%- endif %}
        {%- endif %}
        {%- if loop.index0 > ns.last_query_index %}
            {%- if loop.last or (not loop.last and reasoning_content) %}
                {{- '<|im_start|>' + message.role + '\n<think>\n' + reasoning_content.strip('\n') + '\n</think>\n\n' + content.lstrip('\n') }}
            {%- else %}
                {{- '<|im_start|>' + message.role + '\n' + content }}
            {%- endif %}
        {%- else %}
            {{- '<|im_start|>' + message.role + '\n' + content }}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {{- content }}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\n\n</think>\n\n' }}
    {%- endif %}
{%- endif %}"""

# mistralai/Mistral-7B-Instruct-v0.3: the system message goes into the conversation's *last* user message only.
MISTRAL_V03 = r"""{%- if messages[0]["role"] == "system" %}
    {%- set system_message = messages[0]["content"] %}
    {%- set loop_messages = messages[1:] %}
{%- else %}
    {%- set loop_messages = messages %}
{%- endif %}
{%- if not tools is defined %}
    {%- set tools = none %}
{%- endif %}
{%- set user_messages = loop_messages | selectattr("role", "equalto", "user") | list %}

{#- This block checks for alternating user/assistant messages, skipping tool calling messages #}
{%- set ns = namespace() %}
{%- set ns.index = 0 %}
{%- for message in loop_messages %}
    {%- if not (message.role == "tool" or message.role == "tool_results" or (message.tool_calls is defined and message.tool_calls is not none)) %}
        {%- if (message["role"] == "user") != (ns.index % 2 == 0) %}
            {{- raise_exception("After the optional system message, conversation roles must alternate user/assistant/user/assistant/...") }}
        {%- endif %}
        {%- set ns.index = ns.index + 1 %}
    {%- endif %}
{%- endfor %}

{{- bos_token }}
{%- for message in loop_messages %}
    {%- if message["role"] == "user" %}
        {%- if tools is not none and (message == user_messages[-1]) %}
            {{- "[AVAILABLE_TOOLS] [" }}
            {%- for tool in tools %}
                {%- set tool = tool.function %}
                {{- '{"type": "function", "function": {' }}
                {%- for key, val in tool.items() if key != "return" %}
                    {%- if val is string %}
                        {{- '"' + key + '": "' + val + '"' }}
                    {%- else %}
                        {{- '"' + key + '": ' + val|tojson }}
                    {%- endif %}
                    {%- if not loop.last %}
                        {{- ", " }}
                    {%- endif %}
                {%- endfor %}
                {{- "}}" }}
                {%- if not loop.last %}
                    {{- ", " }}
                {%- else %}
                    {{- "]" }}
                {%- endif %}
            {%- endfor %}
            {{- "[/AVAILABLE_TOOLS]" }}
            {%- endif %}
        {%- if loop.last and system_message is defined %}
            {{- "[INST] " + system_message + "\n\n" + message["content"] + "[/INST]" }}
        {%- else %}
            {{- "[INST] " + message["content"] + "[/INST]" }}
        {%- endif %}
    {%- elif message.tool_calls is defined and message.tool_calls is not none %}
        {{- "[TOOL_CALLS] [" }}
        {%- for tool_call in message.tool_calls %}
            {%- set out = tool_call.function|tojson %}
            {{- out[:-1] }}
            {%- if not tool_call.id is defined or tool_call.id|length != 9 %}
                {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
            {%- endif %}
            {{- ', "id": "' + tool_call.id + '"}' }}
            {%- if not loop.last %}
                {{- ", " }}
            {%- else %}
                {{- "]" + eos_token }}
            {%- endif %}
        {%- endfor %}
    {%- elif message["role"] == "assistant" %}
        {{- " " + message["content"]|trim + eos_token}}
    {%- elif message["role"] == "tool_results" or message["role"] == "tool" %}
        {%- if message.content is defined and message.content.content is defined %}
            {%- set content = message.content.content %}
        {%- else %}
            {%- set content = message.content %}
        {%- endif %}
        {{- '[TOOL_RESULTS] {"content": ' + content|string + ", " }}
        {%- if not message.tool_call_id is defined or message.tool_call_id|length != 9 %}
            {{- raise_exception("Tool call IDs should be alphanumeric strings with length 9!") }}
        {%- endif %}
        {{- '"call_id": "' + message.tool_call_id + '"}[/TOOL_RESULTS]' }}
    {%- else %}
        {{- raise_exception("Only user and assistant roles are supported, with the exception of an initial optional system message!") }}
    {%- endif %}
{%- endfor %}
"""

QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

SYSTEM = {"role": "system", "content": "You are terse."}
TURNS = [
    {"role": "user", "content": "What is one?"},
    {"role": "assistant", "content": "answer one"},
    {"role": "user", "content": "And two?"},
    {"role": "assistant", "content": "answer two"},
]
CONVERSATIONS = {"system": [SYSTEM, *TURNS], "no_system": TURNS}

# Llama 3 and Qwen2's pre-tokenizer split (Qwen2 splits digits one by one; no digits here).
SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
    r"|\s+(?!\S)|\s+"
)
CORPUS = [
    *(m["content"] for m in [SYSTEM, *TURNS]),
    "system user assistant\n\n",
    "Cutting Knowledge Date: December 2023\nToday Date: 26 Jul 2024\n\n",
    QWEN_DEFAULT_SYSTEM,
    "<think>\n\n</think>\n\n",
]


def byte_bpe(
    specials: list[str], bos: str | None, eos: str, plain: tuple[str, ...] = (), bos_post: bool = False
) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on CORPUS with `specials` as special tokens and `plain` as ordinary added tokens (as
    Qwen3's <think>); `bos_post`: tokenizer(text) prepends BOS, as Llama 3's and Mistral's do."""
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(SPLIT), "isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tk.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=500, special_tokens=specials, initial_alphabet=alphabet, show_progress=False
    )
    tk.train_from_iterator(CORPUS * 4, trainer)
    if bos_post:
        tk.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, tk.token_to_id(bos))]
        )
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token=bos, eos_token=eos)
    tok.add_tokens(list(plain))
    return tok


LLAMA_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def llama(template: str) -> PreTrainedTokenizerFast:
    tok = byte_bpe([*LLAMA_SPECIALS, "<|eom_id|>", "<|python_tag|>"], "<|begin_of_text|>", "<|eot_id|>", bos_post=True)
    tok.chat_template = template
    return tok


def qwen(template: str) -> PreTrainedTokenizerFast:
    tok = byte_bpe(QWEN_SPECIALS, None, "<|im_end|>", plain=("<think>", "</think>"))
    tok.chat_template = template
    return tok


def mistral() -> PreTrainedTokenizerFast:
    tok = byte_bpe(["<unk>", "<s>", "</s>", "[INST]", "[/INST]"], "<s>", "</s>", bos_post=True)
    tok.chat_template = MISTRAL_V03
    return tok


TOKENIZERS = {
    "llama3": lambda: llama(LLAMA3),
    "llama3.1": lambda: llama(LLAMA31),
    "llama3.2": lambda: llama(LLAMA32),
    "qwen2.5": lambda: qwen(QWEN25),
    "qwen3": lambda: qwen(QWEN3),
    "mistral_v0.3": mistral,
}


@pytest.fixture(scope="module", params=list(TOKENIZERS))
def family(request):
    return request.param, TOKENIZERS[request.param]()


def default_system(name: str, kind: str) -> set[str]:
    """Text the family's template writes into the system turn by itself (one of the set; Llama 3.2's is dated the day
    it renders, and the test may straddle a midnight)."""
    if name in ("llama3.1", "llama3.2"):
        now = datetime.datetime.now()
        days = {(now + datetime.timedelta(days=d)).strftime("%d %b %Y") for d in (-1, 0, 1)}
        dates = {"26 Jul 2024"} if name == "llama3.1" else days
        return {f"<|end_header_id|>\n\nCutting Knowledge Date: December 2023\nToday Date: {d}\n\n" for d in dates}
    if name == "qwen2.5" and kind == "no_system":
        return {f"<|im_start|>system\n{QWEN_DEFAULT_SYSTEM}<|im_end|>"}
    return set()


# What each family's rows label for CONVERSATIONS: the assistant's content and the end token of its turn (never the
# newline ChatML writes after <|im_end|>). Qwen3 writes an empty think block into the last assistant turn only.
EXPECTED_RUNS = {
    "llama3": ["answer one<|eot_id|>", "answer two<|eot_id|>"],
    "llama3.1": ["answer one<|eot_id|>", "answer two<|eot_id|>"],
    "llama3.2": ["answer one<|eot_id|>", "answer two<|eot_id|>"],
    "qwen2.5": ["answer one<|im_end|>", "answer two<|im_end|>"],
    "qwen3": ["answer one<|im_end|>", "<think>\n\n</think>\n\nanswer two<|im_end|>"],
    "mistral_v0.3": [" answer one</s>", " answer two</s>"],
}


def labelled_runs(ids: list[int], labels: list[int]) -> list[tuple[int, list[int]]]:
    """(start, token ids) of each maximal run of labelled positions, asserting labels equal ids there."""
    runs: list[tuple[int, list[int]]] = []
    for k, (i, lab) in enumerate(zip(ids, labels, strict=True)):
        if lab == IGNORE_INDEX:
            continue
        assert lab == i
        if runs and runs[-1][0] + len(runs[-1][1]) == k:
            runs[-1][1].append(i)
        else:
            runs.append((k, [i]))
    return runs


def check_conversation(name: str, tok, messages: list[dict]) -> tuple[list[int], list[int]]:
    ids, labels = encode_row(tok, Row({"messages": messages}, "chat.jsonl:1"))
    assert tok.decode(ids) == tok.apply_chat_template(messages, tokenize=False)  # tokens round-trip the template
    runs = labelled_runs(ids, labels)
    assert [tok.decode(run) for _, run in runs] == EXPECTED_RUNS[name]
    # Each run starts where the generation prompt for that turn (what eval prompts with) ends: the row's prefix.
    answers = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    for (start, _), i in zip(runs, answers, strict=True):
        prompt = encode_prompt(tok, messages[:i])
        assert ids[:start] == prompt
    if tok.bos_token is not None:
        assert ids.count(tok.bos_token_id) == 1 and ids[0] == tok.bos_token_id  # the template's BOS, not a second one
    return ids, labels


@pytest.mark.parametrize("kind", list(CONVERSATIONS))
def test_exactly_the_assistant_turns_are_labelled(family, kind):
    name, tok = family
    if name == "mistral_v0.3" and kind == "system":
        pytest.skip("a located error: test_a_system_message_mistral_moves_to_the_last_turn_is_refused")
    ids, labels = check_conversation(name, tok, CONVERSATIONS[kind])
    # System turns, the template's own default one included, are there and masked (they come before every label).
    before_answers = tok.decode(ids[: next(k for k, lab in enumerate(labels) if lab != IGNORE_INDEX)])
    assert (SYSTEM["content"] in before_answers) == (kind == "system")
    defaults = default_system(name, kind)
    assert not defaults or any(text in before_answers for text in defaults)


def test_single_turn_and_untrimmed_content(family):
    name, tok = family
    messages = [{"role": "user", "content": "What is one?"}, {"role": "assistant", "content": "answer one"}]
    ids, labels = encode_row(tok, Row({"messages": messages}, "chat.jsonl:2"))
    expected = EXPECTED_RUNS[name][-1].replace("two", "one")  # the last turn: Qwen3's think block included
    assert [tok.decode(run) for _, run in labelled_runs(ids, labels)] == [expected]
    if name.startswith("llama") or name == "mistral_v0.3":  # these templates trim the content: so do the labels
        padded = [messages[0], {"role": "assistant", "content": "  answer one \n"}]
        assert encode_row(tok, Row({"messages": padded}, "chat.jsonl:3")) == (ids, labels)


def test_qwen3_reasoning_is_dropped_from_earlier_turns_and_kept_in_the_last():
    tok = qwen(QWEN3)
    messages = [
        {"role": "user", "content": "What is one?"},
        {"role": "assistant", "content": "<think>\nfirst\n</think>\n\nanswer one"},
        {"role": "user", "content": "And two?"},
        {"role": "assistant", "content": "<think>\nsecond\n</think>\n\nanswer two"},
    ]
    ids, labels = encode_row(tok, Row({"messages": messages}, "chat.jsonl:4"))
    runs = [tok.decode(run) for _, run in labelled_runs(ids, labels)]
    assert runs == ["answer one<|im_end|>", "<think>\nsecond\n</think>\n\nanswer two<|im_end|>"]


def test_a_system_message_mistral_moves_to_the_last_turn_is_refused():
    # Mistral v0.3 writes the system message into the last user message, so a conversation ending with an answer has
    # none while the generation prompt before that answer has it: no row can be both the eval prompt and its answer.
    tok = mistral()
    messages = CONVERSATIONS["system"]
    full = tok.apply_chat_template(messages, tokenize=False)
    assert "You are terse." not in full
    assert "You are terse." in tok.apply_chat_template(messages[:2], tokenize=False, add_generation_prompt=True)
    with pytest.raises(DataError, match="chat.jsonl:5.*generation prompt"):
        encode_row(tok, Row({"messages": messages}, "chat.jsonl:5"))


def test_a_template_error_names_the_row():
    with pytest.raises(DataError, match="chat.jsonl:6.*roles must alternate"):
        encode_row(mistral(), Row({"messages": [TURNS[0], TURNS[0], TURNS[1]]}, "chat.jsonl:6"))


def test_dpo_chat_prompt_is_the_generation_prompt_and_responses_end_with_the_end_token(family):
    name, tok = family
    context = CONVERSATIONS["no_system"][:3]
    row = Row(
        {"chosen": [*context, TURNS[3]], "rejected": [*context, {"role": "assistant", "content": "answer none"}]}, "x"
    )
    chosen, rejected, _, prompt_length = encode_pair(tok, row, False)
    assert chosen[:prompt_length] == encode_prompt(tok, context) == rejected[:prompt_length]
    assert tok.decode(chosen[prompt_length:]) == EXPECTED_RUNS[name][-1]
    assert tok.decode(rejected[prompt_length:]) == EXPECTED_RUNS[name][-1].replace("two", "none")
    # A reward model reads a sequence's last token; PPO's rollouts end with EOS, so pairs must end there too.
    assert chosen[-1] == rejected[-1] == tok.eos_token_id


def test_a_template_error_in_a_pair_names_the_row():
    bad = [TURNS[0], TURNS[0], TURNS[1]]
    with pytest.raises(DataError, match="pairs.jsonl:3.*roles must alternate"):
        encode_pair(mistral(), Row({"chosen": bad, "rejected": bad}, "pairs.jsonl:3"), False)


def test_turn_end_drops_only_whitespace_after_an_end_token():
    tok = qwen(QWEN25)
    ended = tok("answer one<|im_end|>\n", add_special_tokens=False)["input_ids"]
    assert turn_end(tok, ended) == len(ended) - 1 and turn_end(tok, ended[:-1]) == len(ended) - 1
    plain = tok("answer one\n", add_special_tokens=False)["input_ids"]  # a turn ended by its newline alone keeps it
    assert turn_end(tok, plain) == len(plain)
