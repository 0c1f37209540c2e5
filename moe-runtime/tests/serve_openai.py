"""The official `openai` client against a running moe-serve.

Usage: serve_openai.py BASE_URL MODEL REFERENCE_IDS REFERENCE_LOGPROBS
(the reference's greedy tokens and log-probabilities for prompt [1, 2, 3],
16 new tokens, from `moe-run --reference`). Exits non-zero on the first
failed check, saying which.
"""

import json
import sys
import urllib.error
import urllib.request

import openai

base, model = sys.argv[1], sys.argv[2]
ref_ids = [int(x) for x in sys.argv[3].split()]
ref_lps = [float(x) for x in sys.argv[4].split()]
client = openai.OpenAI(base_url=base + "/v1", api_key="none", max_retries=0, timeout=120)


def check(cond: object, what: str) -> None:
    """Exit saying `what` failed unless `cond`."""
    if not cond:
        sys.exit(f"FAILED: {what}")
    print(f"ok: {what}")


models = client.models.list()
check([m.id for m in models.data] == [model], f"/v1/models lists {model}")

# Greedy tokens equal the reference (token ids through vLLM's extension).
r = client.completions.create(
    model=model,
    prompt=[1, 2, 3],
    max_tokens=16,
    temperature=0,
    logprobs=2,
    extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True},
)
ids = [int(t.split(":")[1]) for t in r.choices[0].logprobs.tokens]
check(ids == ref_ids, f"temperature 0 gives moe-run --reference's tokens ({ids} vs {ref_ids})")
lps = r.choices[0].logprobs.token_logprobs
check(all(abs(a - b) < 1e-5 for a, b in zip(lps, ref_lps)), "and its log-probabilities")
check(
    all(len(t) == 2 for t in r.choices[0].logprobs.top_logprobs),
    "top_logprobs has 2 entries per token",
)
check(
    r.usage.prompt_tokens == 3 and r.usage.completion_tokens == 16 and r.usage.total_tokens == 19,
    "completion usage",
)
check(r.choices[0].finish_reason == "length", "finish_reason length")

# Chat, not streamed and streamed: the same text for the same seed.
msgs = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a colour."},
]
a = client.chat.completions.create(
    model=model,
    messages=msgs,
    max_tokens=20,
    temperature=0.9,
    seed=7,
    extra_body={"ignore_eos": True},
)
b = client.chat.completions.create(
    model=model,
    messages=msgs,
    max_tokens=20,
    temperature=0.9,
    seed=7,
    extra_body={"ignore_eos": True},
)
c = client.chat.completions.create(
    model=model,
    messages=msgs,
    max_tokens=20,
    temperature=0.9,
    seed=8,
    extra_body={"ignore_eos": True},
)
check(
    a.choices[0].message.content == b.choices[0].message.content,
    "the same seed gives the same text",
)
check(
    a.choices[0].message.content != c.choices[0].message.content, "another seed gives another text"
)
check(
    a.choices[0].message.role == "assistant" and a.object == "chat.completion",
    "chat response shape",
)
check(a.usage.completion_tokens == 20 and a.usage.prompt_tokens > 5, "chat usage")
stream = client.chat.completions.create(
    model=model,
    messages=msgs,
    max_tokens=20,
    temperature=0.9,
    seed=7,
    stream=True,
    stream_options={"include_usage": True},
    extra_body={"ignore_eos": True},
)
parts, finish, usage = [], None, None
for chunk in stream:
    if chunk.usage is not None:
        usage = chunk.usage
    for ch in chunk.choices:
        if ch.delta.content:
            parts.append(ch.delta.content)
        if ch.finish_reason:
            finish = ch.finish_reason
check(
    "".join(parts) == a.choices[0].message.content,
    "streamed deltas concatenate to the non-streamed text",
)
check(finish == "length", "the last content chunk carries finish_reason")
check(
    usage is not None
    and usage.completion_tokens == 20
    and usage.prompt_tokens == a.usage.prompt_tokens,
    "the usage chunk matches",
)

# Completions streaming with logprobs.
s = client.completions.create(
    model=model,
    prompt="Hello",
    max_tokens=8,
    temperature=0,
    stream=True,
    logprobs=1,
    extra_body={"ignore_eos": True},
)
chunks = list(s)
check(
    len(chunks) == 8 and all(c.choices[0].logprobs is not None for c in chunks),
    "one streamed chunk per token, with logprobs",
)
whole = client.completions.create(
    model=model, prompt="Hello", max_tokens=8, temperature=0, extra_body={"ignore_eos": True}
)
check(
    "".join(c.choices[0].text for c in chunks) == whole.choices[0].text,
    "streamed completion text equals the whole",
)

# Stop strings end the text before them.
full = (
    client.completions.create(
        model=model, prompt=[5, 6, 7], max_tokens=24, temperature=0, extra_body={"ignore_eos": True}
    )
    .choices[0]
    .text
)
stop = full[len(full) // 2 : len(full) // 2 + 2]
if stop.strip():
    cut = client.completions.create(
        model=model,
        prompt=[5, 6, 7],
        max_tokens=24,
        temperature=0,
        stop=[stop],
        extra_body={"ignore_eos": True},
    )
    check(
        cut.choices[0].text == full[: full.index(stop)] and cut.choices[0].finish_reason == "stop",
        f"stop {stop!r} ends the text before it",
    )


# Errors: the right exception class, the server stays up.
def raises(exc: type[Exception], what: str, **kw: object) -> dict:
    """Check a completion with `kw` raises `exc`; its error body."""
    try:
        client.completions.create(model=kw.pop("model", model), **kw)
    except exc as e:
        body = e.body if isinstance(e.body, dict) else {}
        check(True, f"{what}: {type(e).__name__} ({body.get('message', '')[:70]})")
        return body
    sys.exit(f"FAILED: {what}: no {exc.__name__}")


body = raises(openai.NotFoundError, "unknown model", model="gpt-9", prompt="x", max_tokens=1)
check(body.get("code") == "model_not_found", "404 carries code model_not_found")
body = raises(openai.BadRequestError, "n = 17", prompt="x", max_tokens=1, n=17)
check(
    body.get("param") == "n" and body.get("type") == "invalid_request_error", "400 names the field"
)
raises(openai.BadRequestError, "temperature 5", prompt="x", max_tokens=1, temperature=5)
raises(openai.BadRequestError, "max_tokens 0", prompt="x", max_tokens=0)
raises(openai.BadRequestError, "a prompt longer than the context", prompt=[1] * 5000, max_tokens=1)
raises(
    openai.BadRequestError,
    "an unsupported parameter",
    prompt="x",
    max_tokens=1,
    extra_body={"guided_json": {}},
)
try:
    client.chat.completions.create(
        model=model, messages=[{"role": "wizard", "content": "hi"}], max_tokens=1
    )
    sys.exit("FAILED: a bad role was accepted")
except openai.BadRequestError as e:
    check(e.body.get("param") == "messages", "a bad chat message is a 400 naming messages")
req = urllib.request.Request(
    base + "/v1/completions", data=b'{"model": ', headers={"content-type": "application/json"}
)
try:
    urllib.request.urlopen(req)
    sys.exit("FAILED: malformed JSON accepted")
except urllib.error.HTTPError as e:
    err = json.loads(e.read())["error"]
    check(
        e.code == 400
        and "JSON" in err["message"]
        and set(err) == {"message", "type", "param", "code"},
        "malformed JSON is a 400 with an OpenAI error body",
    )
check(client.models.list().data[0].id == model, "the server is still up")
print("serve_openai.py: all passed")
