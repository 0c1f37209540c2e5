"""The OpenAI request in full, and vLLM's sampling extensions, against moe-serve.

The official `openai` client and raw HTTP, against a running server.

Usage: serve_api.py BASE_URL MODEL MODEL_DIR SCORE_IDS SCORES
(SCORE_IDS: a prompt's token ids; SCORES: `moe-run --reference --score`'s
log-probability of each of its tokens after the first). Exits non-zero on
the first failed check, saying which.
"""

import json
import sys
import urllib.error
import urllib.request
from collections import Counter
from pathlib import Path
from typing import Any

import openai

base, model, model_dir = sys.argv[1], sys.argv[2], Path(sys.argv[3])
score_ids = [int(x) for x in sys.argv[4].split()]
scores = [float(x) for x in sys.argv[5].split()]
client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=120)
IDS = {"return_tokens_as_token_ids": True}
TOL = 1e-4


def check(cond: bool, what: str) -> None:
    """Exit saying `what` failed unless `cond`."""
    if not cond:
        sys.exit(f"FAILED: {what}")
    print(f"ok: {what}")


def ids_of(logprobs: Any) -> list[int]:
    """The token ids of completion logprobs named `token_id:N`."""
    return [int(t.split(":")[1]) for t in logprobs.tokens]


def greedy(prompt: Any, n_tokens: int = 6, **extra: Any) -> Any:
    """One greedy choice with token-id logprobs."""
    return client.completions.create(
        model=model,
        prompt=prompt,
        max_tokens=n_tokens,
        temperature=0,
        logprobs=0,
        extra_body={"ignore_eos": True, **IDS, **extra},
    ).choices[0]


def post(path: str, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
    """POST `body` as JSON: (status, reply)."""
    req = urllib.request.Request(
        base + path, data=json.dumps(body).encode(), headers={"content-type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def refused(path: str, body: dict[str, Any], param: str, what: str) -> None:
    """Check `body` is a 400 naming `param`."""
    status, out = post(path, {"model": model, **body})
    err = out.get("error", {})
    check(
        status == 400 and err.get("param") == param and err.get("type") == "invalid_request_error",
        f"{what}: 400 naming {param} ({err.get('message', '')[:70]})",
    )


# ---- Prompts: a string, strings, token ids, token-id lists; one choice each, in order.
singles = [greedy(p) for p in ("The experts", "Attention runs", "x")]
r = client.completions.create(
    model=model,
    prompt=["The experts", "Attention runs", "x"],
    max_tokens=6,
    temperature=0,
    extra_body={"ignore_eos": True},
)
check(
    [c.index for c in r.choices] == [0, 1, 2],
    "a list of strings gives one choice per prompt, indexed",
)
check(
    [c.text for c in r.choices] == [c.text for c in singles],
    "each choice equals its prompt served alone",
)
a, b = greedy([5, 6, 7]), greedy([9, 10])
r = client.completions.create(
    model=model,
    prompt=[[5, 6, 7], [9, 10]],
    max_tokens=6,
    temperature=0,
    logprobs=0,
    extra_body={"ignore_eos": True, **IDS},
)
check(
    [ids_of(c.logprobs) for c in r.choices] == [ids_of(a.logprobs), ids_of(b.logprobs)],
    "a list of token-id lists: one choice each, the tokens of each alone",
)
check(
    r.usage.prompt_tokens == 5 and r.usage.completion_tokens == 12, "usage adds up over the prompts"
)


# ---- n: independent with a seed (and reproducible), identical when greedy.
def texts(**kw: Any) -> list[str]:
    """The choices' texts for prompt Hello."""
    out = client.completions.create(
        model=model, prompt="Hello", max_tokens=12, extra_body={"ignore_eos": True}, **kw
    )
    check([c.index for c in out.choices] == list(range(len(out.choices))), f"indices 0..n-1 ({kw})")
    return [c.text for c in out.choices]


sampled = texts(n=3, temperature=1.0, seed=11)
check(len(set(sampled)) == 3, "n = 3 sampled choices differ from each other")
check(texts(n=3, temperature=1.0, seed=11) == sampled, "the same seed gives the same n choices")
check(texts(n=1, temperature=1.0, seed=12) == sampled[1:2], "choice j samples with seed + j")
greedy3 = texts(n=3, temperature=0)
check(len(set(greedy3)) == 1, "n = 3 greedy choices are identical")
r = client.completions.create(
    model=model,
    prompt=["Hello", "World"],
    n=2,
    max_tokens=4,
    temperature=0,
    extra_body={"ignore_eos": True},
)
check(
    [c.index for c in r.choices] == [0, 1, 2, 3]
    and r.choices[0].text == r.choices[1].text == greedy3[0][: len(r.choices[0].text)],
    "prompts x n: index = prompt * n + j",
)

# ---- best_of: the choice with the highest cumulative log-probability.
three = client.completions.create(
    model=model,
    prompt="Hello",
    n=3,
    max_tokens=8,
    temperature=1.0,
    seed=21,
    logprobs=0,
    extra_body={"ignore_eos": True},
)
best = max(three.choices, key=lambda c: sum(c.logprobs.token_logprobs))
r = client.completions.create(
    model=model,
    prompt="Hello",
    n=1,
    best_of=3,
    max_tokens=8,
    temperature=1.0,
    seed=21,
    extra_body={"ignore_eos": True},
)
check(
    len(r.choices) == 1 and r.choices[0].text == best.text,
    "best_of = 3 returns the most likely of the 3",
)
refused("/v1/completions", {"prompt": "x", "n": 2, "best_of": 1}, "best_of", "best_of below n")
refused(
    "/v1/completions",
    {"prompt": "x", "best_of": 2, "stream": True},
    "best_of",
    "best_of with streaming",
)
refused("/v1/completions", {"prompt": "x", "n": 17}, "n", "n above 16")

# ---- echo, logprobs over the prompt, max_tokens 0 scores it.
r = client.completions.create(
    model=model, prompt=score_ids, max_tokens=0, echo=True, logprobs=1, extra_body=IDS
)
c = r.choices[0]
check(
    ids_of(c.logprobs) == score_ids, "echo with max_tokens 0: the prompt's tokens and nothing more"
)
check(
    c.logprobs.token_logprobs[0] is None and c.logprobs.top_logprobs[0] is None,
    "the first prompt token has no logprob",
)
got = c.logprobs.token_logprobs[1:]
check(
    len(got) == len(scores) and all(abs(x - y) < TOL for x, y in zip(got, scores)),
    f"echoed prompt logprobs equal moe-run --score (max |d| {max(abs(x - y) for x, y in zip(got, scores)):.1e})",  # noqa: E501
)
check(
    all(len(t) >= 1 for t in c.logprobs.top_logprobs[1:]),
    "each prompt position has its top entries",
)
check(r.usage.completion_tokens == 0 and c.finish_reason == "length", "scoring generates nothing")
gen = greedy(score_ids, 4)
r = client.completions.create(
    model=model,
    prompt=score_ids,
    max_tokens=4,
    echo=True,
    logprobs=0,
    temperature=0,
    extra_body={"ignore_eos": True, **IDS},
)
c = r.choices[0]
check(
    ids_of(c.logprobs) == score_ids + ids_of(gen.logprobs),
    "echo + generate: prompt tokens then the completion's",
)
check(
    c.text.endswith(gen.text) and len(c.text) > len(gen.text),
    "echo puts the prompt text before the completion",
)
check(
    c.logprobs.text_offset[0] == 0 and c.logprobs.text_offset == sorted(c.logprobs.text_offset),
    "text offsets",
)
refused(
    "/v1/completions", {"prompt": "x", "max_tokens": 0}, "max_tokens", "max_tokens 0 without echo"
)
s = client.completions.create(
    model=model,
    prompt="Hello",
    max_tokens=4,
    echo=True,
    temperature=0,
    stream=True,
    extra_body={"ignore_eos": True},
)
whole = client.completions.create(
    model=model,
    prompt="Hello",
    max_tokens=4,
    echo=True,
    temperature=0,
    extra_body={"ignore_eos": True},
)
check(
    "".join(ch.choices[0].text for ch in s) == whole.choices[0].text,
    "streamed echo equals the whole",
)

# ---- vLLM's prompt_logprobs.
status, out = post(
    "/v1/completions", {"model": model, "prompt": score_ids, "max_tokens": 1, "prompt_logprobs": 2}
)
pl = out["choices"][0]["prompt_logprobs"]
check(
    status == 200 and pl[0] is None and len(pl) == len(score_ids),
    "prompt_logprobs: null then one map per token",
)
check(
    all(
        abs(pl[i + 1][str(t)]["logprob"] - s) < TOL
        for i, (t, s) in enumerate(zip(score_ids[1:], scores))
    ),
    "prompt_logprobs carry the prompt token's own logprob (= moe-run --score)",
)
check(
    all(len(m) in (2, 3) and m[str(t)]["rank"] >= 1 for m, t in zip(pl[1:], score_ids[1:])),
    "the token plus the 2 most likely, with ranks",
)
check(
    all(
        m[str(t)]["rank"] == 1 + sum(1 for e in m.values() if e["logprob"] > m[str(t)]["logprob"])
        for m, t in zip(pl[1:], score_ids[1:])
        if m[str(t)]["rank"] <= 2
    ),
    "ranks agree with the logprobs shown",
)
status, out = post(
    "/v1/chat/completions",
    {
        "model": model,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 1,
        "prompt_logprobs": 0,
    },
)
check(
    status == 200
    and out["prompt_logprobs"][0] is None
    and len(out["prompt_logprobs"]) == out["usage"]["prompt_tokens"],
    "chat returns prompt_logprobs at the top level",
)
refused(
    "/v1/completions",
    {"prompt": "x", "prompt_logprobs": 1, "stream": True},
    "prompt_logprobs",
    "prompt_logprobs with streaming",
)

# ---- Penalties: greedy under presence/frequency equals the argmax of the raw top-20 logprobs
# minus the penalties over the tokens generated before (checked step by step).
prompt = [5, 6, 7]
for pres, freq in ((1.5, 0.0), (0.0, 1.0), (0.7, 0.6)):
    r = client.completions.create(
        model=model,
        prompt=prompt,
        max_tokens=10,
        temperature=0,
        logprobs=20,
        presence_penalty=pres,
        frequency_penalty=freq,
        extra_body={"ignore_eos": True, **IDS},
    )
    lp = r.choices[0].logprobs
    toks = ids_of(lp)
    ok = True
    for k, tops in enumerate(lp.top_logprobs):
        counts = Counter(toks[:k])
        pen = {
            int(t.split(":")[1]): v
            - freq * counts[int(t.split(":")[1])]
            - (pres if counts[int(t.split(":")[1])] else 0)
            for t, v in tops.items()
        }
        ok &= toks[k] == max(pen, key=lambda t: (pen[t], -t))
    check(ok, f"presence {pres}, frequency {freq}: each greedy token is the penalised argmax")
plain = ids_of(greedy(prompt, 10).logprobs)
if len(set(plain)) < len(plain):
    r = greedy(prompt, 10, frequency_penalty=2.0)
    check(
        ids_of(r.logprobs) != plain, "a frequency penalty changes a greedy run that repeats itself"
    )
rep = ids_of(greedy(prompt, 10, repetition_penalty=1.8).logprobs)
check(
    rep[0] not in prompt or rep != plain,
    "a repetition penalty changes or avoids the prompt's tokens",
)
check(
    ids_of(
        greedy(
            prompt,
            10,
            repetition_penalty=1.0,
            presence_penalty=0.0,
            frequency_penalty=0.0,
            top_k=-1,
            min_p=0.0,
            min_tokens=0,
        ).logprobs
    )
    == plain,
    "neutral values change nothing",
)
sample = dict(temperature=1.0, seed=3, max_tokens=10, logprobs=0)
for extra in ({"top_k": 1}, {"min_p": 1.0}):
    r = client.completions.create(
        model=model, prompt=prompt, **sample, extra_body={"ignore_eos": True, **IDS, **extra}
    )
    check(ids_of(r.choices[0].logprobs) == plain, f"sampling with {extra} is greedy")
r = client.completions.create(
    model=model, prompt=prompt, **sample, extra_body={"ignore_eos": True, **IDS, "top_k": 2}
)
toks = ids_of(r.choices[0].logprobs)
check(toks != plain, "top_k 2 at temperature 1 samples off the greedy path")
for bad, param in (
    ({"top_k": -2}, "top_k"),
    ({"min_p": 1.5}, "min_p"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"min_tokens": 9, "max_tokens": 4}, "min_tokens"),
):
    refused("/v1/completions", {"prompt": "x", **bad}, param, f"{bad}")

# ---- stop_token_ids, min_tokens, include_stop_str_in_output, stop_reason.
first = plain[0]
c = greedy(prompt, 10, stop_token_ids=[first])
check(
    ids_of(c.logprobs) == [first] and c.finish_reason == "stop" and c.text == "",
    "a stop token id ends the choice, out of the text",
)
check(getattr(c, "stop_reason", None) == first, "stop_reason names the stop token id")
c = greedy(prompt, 10, stop_token_ids=[first], include_stop_str_in_output=True)
check(
    c.text != "" and c.finish_reason == "stop",
    "include_stop_str_in_output keeps the stop token's text",
)
c = greedy(prompt, 10, stop_token_ids=[first], min_tokens=3)
got = ids_of(c.logprobs)
check(first not in got[:3] and len(got) >= 3, "min_tokens bars the stop token for the first tokens")
full = greedy(prompt, 12).text
stop = full[len(full) // 2 : len(full) // 2 + 2]
if stop.strip():
    c = greedy(prompt, 12, stop=[stop], include_stop_str_in_output=True)
    check(
        c.text == full[: full.index(stop) + len(stop)] and getattr(c, "stop_reason", None) == stop,
        "include_stop_str_in_output keeps the stop string; stop_reason names it",
    )

# ---- skip_special_tokens: the tokenizer's special tokens leave the text unless asked.
tok = json.loads((model_dir / "tokenizer.json").read_text())
special = next(t for t in tok["added_tokens"] if t["special"])
body = {"model": model, "prompt": [5, special["id"], 6], "max_tokens": 0, "echo": True}
_, kept = post("/v1/completions", {**body, "skip_special_tokens": False})
_, skipped = post("/v1/completions", body)
check(
    special["content"] in kept["choices"][0]["text"]
    and special["content"] not in skipped["choices"][0]["text"],
    f"skip_special_tokens (default true) drops {special['content']!r}; false keeps it",
)

# ---- Refused clearly.
refused("/v1/completions", {"prompt": "x", "suffix": "y"}, "suffix", "suffix")
refused("/v1/completions", {"prompt": "x", "logit_bias": {"5": 10}}, "logit_bias", "logit_bias")
msgs = [{"role": "user", "content": "Name a colour."}]
tool = {
    "type": "function",
    "function": {"name": "f", "parameters": {"type": "object", "properties": {}}},
}
refused("/v1/chat/completions", {"messages": msgs, "tools": [tool]}, "tools", "chat tools")
refused(
    "/v1/chat/completions",
    {"messages": msgs, "tool_choice": "auto"},
    "tool_choice",
    "chat tool_choice",
)
refused(
    "/v1/chat/completions",
    {"messages": msgs, "response_format": {"type": "json_object"}},
    "response_format",
    "a JSON response_format",
)

# ---- Chat: neutral tool settings, text response_format, max_completion_tokens, n, stream_options.
r = client.chat.completions.create(
    model=model,
    messages=msgs,
    max_completion_tokens=5,
    tools=[],
    tool_choice="none",
    response_format={"type": "text"},
    n=2,
    temperature=1.0,
    seed=5,
    extra_body={"ignore_eos": True},
)
check(
    r.usage.completion_tokens == 10 and [c.index for c in r.choices] == [0, 1],
    "chat: max_completion_tokens, n = 2",
)
stream = client.chat.completions.create(
    model=model,
    messages=msgs,
    max_completion_tokens=5,
    n=2,
    temperature=1.0,
    seed=5,
    stream=True,
    stream_options={"include_usage": True},
    extra_body={"ignore_eos": True},
)
parts: dict[int, str] = {0: "", 1: ""}
usage = None
for chunk in stream:
    usage = chunk.usage or usage
    for ch in chunk.choices:
        parts[ch.index] += ch.delta.content or ""
check(
    [parts[0], parts[1]] == [c.message.content for c in r.choices],
    "streamed n = 2 chat: each index's deltas equal its choice",
)
check(
    usage is not None and usage.completion_tokens == 10,
    "the streamed usage chunk counts both choices",
)
print("serve_api.py: all passed")
