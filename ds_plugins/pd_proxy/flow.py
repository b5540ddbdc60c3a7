"""The bodies of the two steps, from the client's request (pure functions, no I/O).

1. Prefill: the request with max_tokens 1, no streaming, `ignore_eos` and no stop conditions (so the
   prefill always ends length-capped, the case in which the connector keeps the blocks and answers
   kv_transfer_params), and `kv_transfer_params: {"do_remote_decode": true}`. Where the prompt's token
   ids are known (a completion; a text-only chat without tools, documents, reasoning_effort or
   response_format, rendered by the prefill's own /tokenize), it gets all but the last prompt token:
   the decode instance then computes that token itself with its whole attention window in place (the
   connector reads `remote_num_tokens`; with sliding-window KV a whole-prompt prefill leaves the last
   token's window one token short at some prompt lengths, see README). Otherwise it gets the prompt whole.
2. Decode: the client's request as sent, with the prefill's kv_transfer_params.

The proxy owns kv_transfer_params: whatever a client sends under that key is dropped, never passed on
(a forged one would name someone else's blocks or an arbitrary host).
"""

from __future__ import annotations

import copy

COMPLETION, CHAT = "/v1/completions", "/v1/chat/completions"
PREFILL_PARAMS = {
    "do_remote_decode": True,
    "do_remote_prefill": False,
    "remote_engine_id": None,
    "remote_block_ids": None,
    "remote_host": None,
    "remote_port": None,
}
# What ends or shapes generation: meaningless for a one-token prefill, and a stop at its token would
# leave the request "stopped", not length-capped, which gives no kv_transfer_params.
_NOT_FOR_PREFILL = (
    "max_completion_tokens",
    "min_tokens",
    "stream_options",
    "stop",
    "stop_token_ids",
    "n",
    "best_of",
    "echo",
    "prompt_logprobs",
    "logprobs",
    "top_logprobs",
    "return_token_ids",
)
# Chat keys that change the rendered prompt but that /tokenize does not take (vLLM 0.32
# TokenizeChatRequest vs ChatCompletionRequest.build_chat_params): such chats go to the prefill whole.
_RENDERED_ONLY_BY_CHAT = ("documents", "reasoning_effort", "response_format", "tools", "tool_choice")
# What /tokenize takes for a chat (vLLM's TokenizeChatRequest), passed as the client sent it.
_CHAT_TOKENIZE_KEYS = (
    "model",
    "messages",
    "add_generation_prompt",
    "continue_final_message",
    "add_special_tokens",
    "chat_template",
    "chat_template_kwargs",
)
# Kept from the client's request when the prefill is a completion of token ids made from a chat.
_KEPT_FOR_IDS = ("model", "cache_salt", "priority")


class RequestError(ValueError):
    """The client's request cannot go through P/D as sent (answered 400)."""


def client_body(raw: object, path: str) -> tuple[dict, bool]:
    """The client's request without kv_transfer_params, and whether it carried some."""
    if not isinstance(raw, dict):
        raise RequestError("the request body must be a JSON object")
    body = dict(raw)
    forged = body.pop("kv_transfer_params", None) is not None
    for key in ("n", "best_of"):
        if body.get(key) not in (None, 1):
            raise RequestError(
                f"{key}={body[key]!r}: the P/D proxy serves one sequence per request "
                f"(the prefill's KV blocks can be read once)"
            )
    if path == COMPLETION:
        body["prompt"] = single_prompt(body.get("prompt"))
    elif not isinstance(body.get("messages"), list):
        raise RequestError("messages must be a list")
    return body, forged


def single_prompt(prompt: object) -> str | list[int]:
    """A completion's prompt, one text or one list of token ids (a one-element batch is unwrapped)."""
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str) and prompt:
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(t, int) and not isinstance(t, bool) for t in prompt):
        return prompt
    if isinstance(prompt, list) and prompt and all(isinstance(p, (str, list)) for p in prompt):
        raise RequestError("prompt: the P/D proxy takes one prompt per request, not a batch")
    raise RequestError("prompt must be a non-empty text or a non-empty list of token ids")


def tokenize_request(path: str, body: dict) -> dict | None:
    """The prefill's /tokenize request that gives this prompt's token ids, or None where the prompt goes
    to the prefill whole: ids already, a chat the proxy cannot render as vLLM's chat endpoint would
    (multimodal parts, tools, documents, ...), or truncate_prompt_tokens (left to the engines)."""
    if body.get("truncate_prompt_tokens") is not None:
        return None
    if path == COMPLETION:
        if not isinstance(body["prompt"], str):
            return None
        return {
            "model": body.get("model"),
            "prompt": body["prompt"],
            "add_special_tokens": body.get("add_special_tokens", True),
        }
    if any(body.get(key) is not None for key in _RENDERED_ONLY_BY_CHAT):
        return None
    for message in body["messages"]:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, list) and not all(isinstance(p, dict) and p.get("type") == "text" for p in content):
            return None  # images, audio, ...: their features are part of the KV, not of the token ids
    return {key: body[key] for key in _CHAT_TOKENIZE_KEYS if key in body}


def prefill_body(path: str, body: dict, prompt_ids: list[int] | None) -> tuple[str, dict]:
    """The prefill's endpoint and request. `prompt_ids`: the prompt's token ids, when known."""
    if prompt_ids is not None and len(prompt_ids) > 1:
        if path == CHAT:  # the rendered chat as a completion of its token ids: the same KV
            out = {key: body[key] for key in _KEPT_FOR_IDS if key in body}
        else:
            out = copy.deepcopy(body)
            out.pop("add_special_tokens", None)  # ids are taken as they are
        out["prompt"] = prompt_ids[:-1]
        path = COMPLETION
    else:
        out = copy.deepcopy(body)
    for key in _NOT_FOR_PREFILL:
        out.pop(key, None)
    out.update(max_tokens=1, stream=False, ignore_eos=True, kv_transfer_params=dict(PREFILL_PARAMS))
    return path, out


def decode_body(body: dict, params: dict) -> dict:
    return {**body, "kv_transfer_params": params}


def usable_params(answer: object) -> dict | None:
    """The prefill's kv_transfer_params, if its answer has the shape the connector gives."""
    params = answer.get("kv_transfer_params") if isinstance(answer, dict) else None
    if isinstance(params, dict) and params.get("do_remote_prefill") is True:
        return params
    return None
