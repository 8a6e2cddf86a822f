"""The exchanges of the differential test on the REST APIs, in the order they run (some change the servers' state:
registrations, scaling, unregistering), each with the documented differences it is expected to show."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from tests.compat import normalize as n
from tests.compat.archives import digit_png
from tests.compat.exchange import CLIENT_HEADERS, Case, Expected, Port, Request

# The words of docs/migration.md that document each deliberate difference.
D_RESULT_TYPE = "| an answer whose handler set no content type | a `Content-Type`"
D_CONNECTION = "| an error answer | the connection stays open"
D_413_CLOSE = "| a body over `max_request_size` | 413, and the connection closes"
D_413_HEADERS = "| CORS and caching headers on a 413"
D_RAISED = "| the handler raised | **500**"
D_BAD_OUTPUT = "| the handler returned something other than a list, or a list of the wrong length | **500**"
D_UNSENDABLE = "| a result that cannot be sent (not bytes, str, tensor or JSON-serialisable) | **500** for that request"
D_CUDA = "| the exception's text mentions CUDA | **500**"
D_BAD_JSON = "| a body sent as `application/json` that is not JSON | **400** for that request, before the handler |"
D_NAN = "| a result holding a float `NaN` or infinity | `null`"
D_HEADER_CASE = "| the handler looks up a request header | found whatever the case of the name"
D_OIP = "| the Open Inference Protocol and KServe v1 routes | always served"
D_UNREGISTERED_RUNNING = "| a request running when its model is unregistered | answered once the worker stops"
D_WORKER_DIED = "| the worker process died (crash, signal, OOM kill) | **500**, naming the signal"
D_RETRY_AFTER = "| any 503 (no worker, queue full, unregistering) | with `Retry-After`"
D_BAD_PARAMETER = "`synchronous=maybe`, `customized=yes`) | **400** naming the parameter"
D_NEVER_ANSWERED = "500 `Worker died.` in some runs, never answered in others"
D_FAILED_REGISTER = "TorchServe removes it again in some runs, so that a describe right after answers 404"
D_UNREGISTER_TIMEOUT = "| unregister while a request runs past `unregister_model_timeout` | the request may finish"
D_SEQUENCE_ENDED = "| a request naming a sequence this server ended (closed, expired, lost with its worker)"
D_SEQUENCE_FREED = "| a sequence that has ended (the end header in its last answer) | frees its place"
D_ONE_CHUNK = "| a request that ends in the iteration it joins (its first chunk is its last) | answered"
D_SEQUENCE_NUMBERS = "| a 503 for `maxNumSequence` or `maxSequenceJobQueueSize` | TorchServe's words, then which limit"

OCTET = (("content-type", "application/octet-stream"),)
TEXT = (("content-type", "text/plain; charset=utf-8"),)
JSON = (("content-type", "application/json"),)
FORM = (("content-type", "application/x-www-form-urlencoded"),)
BOUNDARY = "compat-boundary-7f3a"


def req(
    method: str, path: str, body: bytes | None = None, headers: tuple[tuple[str, str], ...] = (), **kw: Any
) -> Request:
    return Request(method, path, body=body, headers=headers, **kw)


def mgmt(
    method: str, path: str, body: bytes | None = None, headers: tuple[tuple[str, str], ...] = (), **kw: Any
) -> Request:
    port: Port = "management"
    return Request(method, path, port=port, body=body, headers=headers, **kw)


def case(name: str, *requests: Request, **kw: Any) -> Case:
    return Case(name, requests, **kw)


def exp(
    aspect: str, docs: str, tolerate: Callable[[str], str] | None = None, sometimes: bool = False, **kw: Any
) -> Expected:
    return Expected(aspect, docs, tolerate, sometimes, **kw)


def multipart(*parts: tuple[str, str | None, str | None, bytes]) -> tuple[bytes, tuple[tuple[str, str], ...]]:
    """A multipart/form-data body from (name, filename, content type, data) parts, the same bytes for both."""
    out = b""
    for name, filename, content_type, data in parts:
        disposition = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{BOUNDARY}\r\nContent-Disposition: {disposition}\r\n".encode()
        out += f"Content-Type: {content_type}\r\n".encode() if content_type else b""
        out += b"\r\n" + data + b"\r\n"
    return out + f"--{BOUNDARY}--\r\n".encode(), (("content-type", f"multipart/form-data; boundary={BOUNDARY}"),)


RESULT_CT = exp("header:content-type", D_RESULT_TYPE)
FORM_BODY, FORM_HEADERS = multipart(
    ("a", None, None, b"plain value"),
    ("file", "notes.txt", "text/plain", b"file text"),
    ("bin", "blob.bin", "application/octet-stream", b"\x00\x01\x02"),
)


def kinds(kind: str, *expected: Expected, **kw: Any) -> Case:
    return case(f"result_{kind}", req("POST", "/predictions/kinds", kind.encode()), expected=expected, **kw)


def headers_case(name: str, spec: dict[str, Any], *expected: Expected, extra: tuple[str, ...] = ()) -> Case:
    request = req("POST", "/predictions/headers", json.dumps(spec).encode(), JSON)
    return case(name, request, body="text", headers=(*("content-type", "x-request-id"), *extra), expected=expected)


def status_case(name: str, line: str, *expected: Expected) -> Case:
    return case(name, req("POST", "/predictions/status", line.encode()), body="text", reason=True, expected=expected)


def whole_answer(docs: str) -> tuple[Expected, ...]:
    """A documented difference of the whole answer (a route TorchServe serves and servekit does not, say): its
    status, body and content type differ."""
    return exp("status", docs), exp("body", docs), exp("header:content-type", docs)


HEALTH_AND_ROUTES = [
    case("ping", req("GET", "/ping")),
    case("ping_post", req("POST", "/ping")),
    case("root_get", req("GET", "/")),
    case("root_options", req("OPTIONS", "/"), body="skip"),
    case("model_options", req("OPTIONS", "/predictions/noop"), body="skip"),
    case("api_description", req("GET", "/api-description"), body="skip"),
    case("unknown_route", req("GET", "/nope")),
    case(
        "unknown_model",
        req("POST", "/predictions/missing", b"x"),
        headers=(*CLIENT_HEADERS, "connection"),
        expected=(exp("header:connection", D_CONNECTION),),
    ),
    case("unknown_version", req("POST", "/predictions/noop/9.9", b"x")),
    case("oip_health_ready", req("GET", "/v2/health/ready"), expected=(exp("status", D_OIP), exp("body", D_OIP))),
]

RESULTS = [
    case("noop_post", req("POST", "/predictions/noop", b"x"), body="text", expected=(RESULT_CT,)),
    case("noop_version", req("POST", "/predictions/noop/1.0", b"x"), body="text", expected=(RESULT_CT,)),
    case("noop_get", req("GET", "/predictions/noop"), body="text", expected=(RESULT_CT,)),
    case("noop_put", req("PUT", "/predictions/noop", b"x"), body="text", expected=(RESULT_CT,)),
    case("noop_head", req("HEAD", "/predictions/noop"), body="text", expected=(RESULT_CT,)),
    case(
        "echo_bytes",
        req("POST", "/predictions/echo", b"\x00\x01\xffbinary", OCTET),
        body="bytes",
        expected=(RESULT_CT,),
    ),
    case("echo_no_content_type", req("POST", "/predictions/echo", b"raw body"), body="bytes", expected=(RESULT_CT,)),
    case(
        "echo_text", req("POST", "/predictions/echo", "h\u00e9llo".encode(), TEXT), body="bytes", expected=(RESULT_CT,)
    ),
    case(
        "echo_json", req("POST", "/predictions/echo", b'{"a": [1, 2.5, null], "b": "x"}', JSON), expected=(RESULT_CT,)
    ),
    case(
        "echo_bad_json",
        req("POST", "/predictions/echo", b"not json", JSON),
        body="text",
        expected=whole_answer(D_BAD_JSON),
    ),
    case("echo_empty", req("POST", "/predictions/echo", b"", OCTET), body="bytes", expected=(RESULT_CT,)),
    case(
        "echo_over_max_request_size",
        req("POST", "/predictions/echo", b"x" * 2_000_000, OCTET),
        body="text",
        headers=(*CLIENT_HEADERS, "connection"),
        expected=(
            exp("header:connection", D_413_CLOSE),
            *(exp(f"header:{name}", D_413_HEADERS) for name in ("cache-control", "pragma", "expires")),
        ),
    ),
    kinds("str", RESULT_CT, body="text"),
    kinds("unicode", RESULT_CT, body="text"),
    kinds("emptystr", RESULT_CT, body="text"),
    kinds("dict", RESULT_CT),
    kinds("list", RESULT_CT),
    kinds("int", RESULT_CT),
    kinds("float", RESULT_CT),
    kinds("none", RESULT_CT),
    kinds("nan", RESULT_CT, exp("body", D_NAN)),
    kinds("bytes", RESULT_CT, body="bytes"),
    kinds("tensor", RESULT_CT, body="tensor"),
    kinds("object", exp("status", D_UNSENDABLE), exp("body", D_UNSENDABLE)),
    kinds("nonlist", exp("status", D_BAD_OUTPUT), exp("body", D_BAD_OUTPUT)),
    kinds("short", exp("status", D_BAD_OUTPUT), exp("body", D_BAD_OUTPUT)),
    case(
        "raises_runtime",
        req("POST", "/predictions/raises", b"runtime"),
        expected=(exp("status", D_RAISED), exp("body", D_RAISED)),
    ),
    case("raises_memory", req("POST", "/predictions/raises", b"memory")),
    case(
        "raises_cuda",
        req("POST", "/predictions/raises", b"cuda"),
        expected=(exp("status", D_CUDA), exp("body", D_CUDA)),
    ),
    case("raises_prediction_exception", req("POST", "/predictions/raises", b"prediction")),
    headers_case(
        "handler_content_type",
        {"content_type": "application/x-compat", "headers": {"X-Compat": "yes"}},
        extra=("x-compat",),
    ),
    headers_case("handler_content_type_text", {"content_type": "text/plain"}),
    headers_case("handler_content_type_json", {"content_type": "application/json", "body": '{"a":1}'}),
    headers_case(
        "handler_cache_control", {"headers": {"Cache-Control": "max-age=60"}}, RESULT_CT, extra=("cache-control",)
    ),
    status_case("status_201", "201 Created", RESULT_CT),
    status_case("status_custom_phrase", "299 Custom Phrase", RESULT_CT),
    status_case("status_418_no_phrase", "418", RESULT_CT),
    status_case("status_500_from_handler", "500 Handler Says No", RESULT_CT),
    case(
        "batch_one_request_fails",
        req("POST", "/predictions/batchfail", b"good"),
        req("POST", "/predictions/batchfail", b"bad", delay=0.05),
        reason=True,
        expected=(exp("header:content-type[0]", D_RESULT_TYPE), exp("header:content-type[1]", D_RESULT_TYPE)),
    ),
    case(
        "mnist_png",
        req("POST", "/predictions/mnist", digit_png(1), (("content-type", "image/png"),)),
        expected=(RESULT_CT,),
    ),
    case("mnist_torchscript_png", req("POST", "/predictions/mnist_ts", digit_png(1)), expected=(RESULT_CT,)),
]

HANDLER_INPUTS = [
    case(
        "inspect_json",
        req("POST", "/predictions/inspect", b'{"x": 1}', (("Content-Type", "application/json"),)),
        fix=n.any_header_case,
        expected=(RESULT_CT,),
    ),
    case(
        "inspect_header_case",
        req("POST", "/predictions/inspect", b"x", (("X-Compat-Probe", "Value"),)),
        expected=(RESULT_CT, exp("body", D_HEADER_CASE, n.on_json(n.any_header_case))),
    ),
    case(
        "inspect_text",
        req("POST", "/predictions/inspect", b"some text", TEXT),
        fix=n.any_header_case,
        expected=(RESULT_CT,),
    ),
    case("inspect_no_content_type", req("POST", "/predictions/inspect", b"\x00raw"), expected=(RESULT_CT,)),
    case(
        "inspect_form_urlencoded",
        req("POST", "/predictions/inspect", b"a=1&b=two+words", FORM),
        fix=n.any_header_case,
        expected=(RESULT_CT,),
    ),
    case(
        "inspect_multipart",
        req("POST", "/predictions/inspect", FORM_BODY, FORM_HEADERS),
        fix=n.any_header_case,
        expected=(RESULT_CT,),
    ),
    case("inspect_query_not_forwarded", req("POST", "/predictions/inspect?x=1", b"q"), expected=(RESULT_CT,)),
]

WORKERS = (n.WORKERS,)
MANAGEMENT = [
    case("list_models", mgmt("GET", "/models")),
    case("list_models_page", mgmt("GET", "/models?limit=3&next_page_token=2")),
    case("describe", mgmt("GET", "/models/noop"), subs=WORKERS),
    case(
        "describe_version",
        mgmt("GET", "/models/mnist/1.0"),
        subs=WORKERS,
    ),
    case(
        "describe_all",
        mgmt("GET", "/models/echo/all"),
        subs=WORKERS,
    ),
    case(
        "describe_customized",
        mgmt("GET", "/models/mnist?customized=true"),
        subs=WORKERS,
    ),
    case("describe_missing", mgmt("GET", "/models/missing")),
    case("scale_sync", mgmt("PUT", "/models/noop?min_worker=1&synchronous=true")),
    case("scale_async", mgmt("PUT", "/models/noop?min_worker=1")),
    case("scale_max_below_min", mgmt("PUT", "/models/noop?min_worker=2&max_worker=1")),
    case("set_default", mgmt("PUT", "/models/noop/1.0/set-default")),
    case("set_default_unknown_version", mgmt("PUT", "/models/noop/9.9/set-default")),
    case("register_without_url", mgmt("POST", "/models")),
    case(
        "register_empty_url",
        mgmt("POST", "/models?url="),
    ),
    case("register_missing_file", mgmt("POST", "/models?url=missing.mar")),
    case("register_duplicate", mgmt("POST", "/models?url=noop.mar")),
    case("register_default_workers", mgmt("POST", "/models?url=reg.mar")),
    case(
        "predict_registered_default_workers",
        req("POST", "/predictions/reg", b"x"),
        expected=(exp("header:retry-after", D_RETRY_AFTER),),
    ),
    case(
        "describe_customized_without_worker",
        mgmt("GET", "/models/reg?customized=true"),
        expected=(exp("header:retry-after", D_RETRY_AFTER),),
    ),
    case("scale_registered", mgmt("PUT", "/models/reg?min_worker=1&synchronous=true")),
    case("predict_registered_scaled", req("POST", "/predictions/reg", b"x"), body="text", expected=(RESULT_CT,)),
    case("unregister", mgmt("DELETE", "/models/reg")),
    case(
        "register_json_body",
        mgmt(
            "POST",
            "/models",
            json.dumps({"url": "reg.mar", "model_name": "regj", "initial_workers": 1, "synchronous": True}).encode(),
            JSON,
        ),
    ),
    case("unregister_json_body", mgmt("DELETE", "/models/regj")),
    case(
        "register_json_lenient",
        mgmt(
            "POST",
            "/models",
            json.dumps(
                {"url": "reg.mar", "model_name": "regl", "initial_workers": "1", "comment": "extra field"}
            ).encode(),
            JSON,
        ),
    ),
    case("unregister_json_lenient", mgmt("DELETE", "/models/regl")),
    case(
        "register_json_single_quotes",  # the body of TorchServe's own ModelServerTest
        mgmt(
            "POST",
            "/models",
            b"{'url':'reg.mar', 'model_name':'regs', 'initial_workers':'1', 'synchronous':'true'}",
            JSON,
        ),
    ),
    case("unregister_json_single_quotes", mgmt("DELETE", "/models/regs")),
    case("register_async_without_workers", mgmt("POST", "/models?url=reg.mar&model_name=rega&synchronous=false")),
    case("unregister_async_without_workers", mgmt("DELETE", "/models/rega")),
    case(
        "register_for_unregister_synchronous_false",
        mgmt("POST", "/models?url=reg.mar&model_name=regu&initial_workers=1"),
    ),
    case("unregister_synchronous_false", mgmt("DELETE", "/models/regu?synchronous=false")),  # ignored: 200 once done
    case(
        "register_failing_initialize",
        mgmt("POST", "/models?url=failinit.mar&initial_workers=1&synchronous=true"),
    ),
    case(  # registered all the same, with no workers (TorchServe: in most runs)
        "describe_after_failed_register",
        mgmt("GET", "/models/failinit"),
        subs=WORKERS,
        expected=(exp("status", D_FAILED_REGISTER, sometimes=True), exp("body", D_FAILED_REGISTER, sometimes=True)),
    ),
    case("unregister_missing", mgmt("DELETE", "/models/missing")),
    case("unregister_missing_version", mgmt("DELETE", "/models/noop/9.9")),
    case("models_patch", mgmt("PATCH", "/models")),
    case("management_root_get", mgmt("GET", "/")),
    case("management_root_options", mgmt("OPTIONS", "/"), body="skip"),
]

PROMETHEUS = (n.HOSTNAMES, n.SAMPLE_VALUES)
METRICS = [
    case(
        f"metrics_{name}",
        Request("GET", f"/metrics?name[]={name}", port="metrics"),
        body="text",
        subs=PROMETHEUS,
        fix=n.sorted_lines,
    )
    for name in (
        "Requests2XX",
        "Requests4XX",
        "Requests5XX",
        "ts_inference_requests_total",
        "ts_inference_latency_microseconds",
        "ts_queue_latency_microseconds",
    )
] + [case("metrics_unfiltered_content_type", Request("GET", "/metrics", port="metrics"), body="skip")]

# Routes TorchServe serves and servekit does not, and the rarer inference routes; after METRICS, whose per-model
# counts they would change.
UNSERVED = [
    case(
        "mnist_explanations",
        req("POST", "/explanations/mnist", digit_png(2)),
        expected=(exp("header:content-type", D_RESULT_TYPE),),
    ),
    case(
        "inspect_explanations",
        req("POST", "/explanations/inspect", b"e"),
        expected=(exp("header:content-type", D_RESULT_TYPE),),
    ),
    case("inspect_url_path", req("POST", "/predictions/inspect/1.0/v1/extra", b"u"), expected=(RESULT_CT,)),
    case(
        "sagemaker_invocations",
        req("POST", "/invocations?model_name=inspect", b"s"),
        expected=(RESULT_CT,),
    ),
    case("sagemaker_invoke", req("POST", "/models/inspect/invoke", b"s"), expected=(RESULT_CT,)),
    case("legacy_predict", req("POST", "/inspect/1.0/predict?q=1", b"l"), expected=(RESULT_CT,)),
]


def customized(name: str, path: str, kind: str | None = None, *expected: Expected, **kw: Any) -> Case:
    """A customized describe of the "described" archive, whose describe_handle answers what ``kind`` asks for."""
    headers = (("x-kind", kind),) if kind else ()
    return case(name, mgmt("GET", path, headers=headers), subs=WORKERS, expected=expected, **kw)


# After METRICS: a customized describe runs the handler (TorchServe counts it as no inference request either).
DESCRIBE_CUSTOMIZED = [
    *(
        customized(f"describe_customized_{kind}", "/models/described?customized=true", kind)
        for kind in ("dict", "jsontext", "bytes", "text", "none", "list", "empty", "nulls")
    ),
    customized("describe_customized_version", "/models/described/1.0?customized=true"),
    customized("describe_customized_all_versions", "/models/described/all?customized=true"),
    customized("describe_customized_false", "/models/described?customized=false"),
    customized("describe_customized_upper_case", "/models/described?customized=TRUE"),
    customized(
        "describe_customized_status_and_headers",
        "/models/described?customized=true",
        "status",
        headers=(*CLIENT_HEADERS, "x-described"),
    ),
    customized(
        "describe_customized_raises",
        "/models/described?customized=true",
        "raise",
        exp("status", D_RAISED),
        exp("body", D_RAISED),
    ),
    customized(
        "describe_customized_not_boolean",
        "/models/described?customized=yes",
        None,
        exp("status", D_BAD_PARAMETER),
        exp("body", D_BAD_PARAMETER),
    ),
    case("describe_customized_missing", mgmt("GET", "/models/missing?customized=true")),
    case(
        "describe_customized_function_handler",
        mgmt("GET", "/models/describefn?customized=true", headers=(("x-probe", "probe value"),)),
        subs=WORKERS,
    ),
]

# Last, as it unregisters "slow" while it serves a request. TorchServe kills the worker at once and answers 200;
# servekit lets the request run for unregister_model_timeout (2 s here), then kills the worker and answers 408.
UNREGISTER_DURING_INFERENCE = [
    case(
        "unregister_during_inference",
        req("POST", "/predictions/slow", b"4", timeout=15),
        mgmt("DELETE", "/models/slow", delay=1.0),
        # TorchServe answers the running request 500 "Worker died." in some runs and never in others; servekit always
        # answers it, naming the model and the signal.
        expected=(
            exp("status[0]", D_UNREGISTERED_RUNNING, sometimes=True),
            exp("body[0]", D_WORKER_DIED, sometimes=True),
            exp("status[1]", D_UNREGISTER_TIMEOUT),
            exp("body[1]", D_UNREGISTER_TIMEOUT),
        ),
    ),
]


# With unregister_model_timeout=0 (test_compat_unregister.py), an unregister while the worker runs a request is
# TorchServe's 408 (its worker is not gone at once), and what it leaves: the model, with no workers. In some runs
# TorchServe's kill is done within the 0 s, and it answers 200 with the model gone ("200 at once" in the docs'
# line): the cases after it then meet no model there, which each accepts "sometimes" (``removed``).
def removed(*aspects: str) -> tuple[Expected, ...]:
    return tuple(exp(aspect, D_UNREGISTER_TIMEOUT, sometimes=True) for aspect in aspects)


def model_gone(torchserve_body: str) -> bool:
    return "ModelNotFoundException" in torchserve_body


UNREGISTER_TIMEOUT = [
    case(
        "unregister_past_timeout",
        req("POST", "/predictions/slow", b"3", timeout=15),
        mgmt("DELETE", "/models/slow", delay=1.0),
        expected=(
            exp("status[0]", D_UNREGISTERED_RUNNING, sometimes=True),
            exp("body[0]", D_WORKER_DIED, sometimes=True),
            *removed("status[1]", "body[1]"),
        ),
    ),
    case(
        "describe_after_unregister_timeout",
        mgmt("GET", "/models/slow"),
        subs=WORKERS,
        # the request TorchServe never answered (in some runs) stays in its queue: "pendingRequests": 1
        expected=(
            *removed("status"),
            exp(
                "body",
                D_NEVER_ANSWERED,
                n.without("jobQueueStatus"),
                sometimes=True,
                also=model_gone,
                also_docs=D_UNREGISTER_TIMEOUT,
            ),
        ),
    ),
    case("list_after_unregister_timeout", mgmt("GET", "/models"), expected=removed("body")),
    case(
        "predict_after_unregister_timeout",
        req("POST", "/predictions/slow", b"0"),
        expected=(exp("header:retry-after", D_RETRY_AFTER), *removed("status", "body")),
    ),
    case(
        "describe_customized_after_unregister_timeout",
        mgmt("GET", "/models/slow?customized=true"),
        expected=(exp("header:retry-after", D_RETRY_AFTER), *removed("status", "body")),
    ),
    case("unregister_again_after_timeout", mgmt("DELETE", "/models/slow"), expected=removed("status", "body")),
    case("describe_after_unregister_again", mgmt("GET", "/models/slow")),
]


def in_sequence(sequence: str, body: bytes, end: bool = False, **kw: Any) -> Request:
    headers = (("ts_request_sequence_id", sequence),) + ((("ts_request_sequence_end", "true"),) if end else ())
    return req("POST", "/predictions/sums", body, headers, **kw)


# ``sums`` holds one sequence at most (maxNumSequence 1, TorchServe's default), named by the client
SEQUENCES = [
    case("sequence_start", in_sequence("compat-a", b"1"), body="text", expected=(RESULT_CT,)),
    case("sequence_goes_on", in_sequence("compat-a", b"2"), body="text", expected=(RESULT_CT,)),
    case(
        "sequence_over_max_num_sequence",
        in_sequence("compat-b", b"5"),
        expected=(
            exp("header:retry-after", D_RETRY_AFTER),
            exp(
                "body",
                D_SEQUENCE_NUMBERS,
                lambda text: re.sub(r" \(\d+ sequences open, maxNumSequence=\d+\)", "", text),
            ),
        ),
    ),
    case("sequence_end", in_sequence("compat-a", b"4", end=True), body="text", expected=(RESULT_CT,)),
    case(
        "sequence_after_an_end",
        in_sequence("compat-b", b"5", delay=2.0),  # TorchServe: still refused 2 s after the end
        body="text",
        expected=tuple(exp(aspect, D_SEQUENCE_FREED) for aspect in ("status", "header:content-type", "body")),
    ),
    case(
        "sequence_ended_named_again",
        in_sequence("compat-a", b"1"),
        expected=tuple(exp(aspect, D_SEQUENCE_ENDED) for aspect in ("status", "header:content-type", "body")),
    ),
]

# ``counter`` (continuous batching): a request of body "N" streams N chunks; TorchServe never answers one of 1
CONTINUOUS = [
    case("continuous_one_request", req("POST", "/predictions/counter", b"3"), body="text", expected=(RESULT_CT,)),
    case(
        "continuous_one_chunk",
        req("POST", "/predictions/counter", b"1", timeout=10),
        body="text",
        expected=(exp("status", D_ONE_CHUNK),),
    ),
    case(
        "continuous_requests_of_different_lengths",
        req("POST", "/predictions/counter", b"5"),
        req("POST", "/predictions/counter", b"2", delay=0.01),
        req("POST", "/predictions/counter", b"1", delay=0.02, timeout=10),
        body="text",
        expected=(*(exp(f"header:content-type[{i}]", D_RESULT_TYPE) for i in range(2)), exp("status[2]", D_ONE_CHUNK)),
    ),
]

CASES = (
    HEALTH_AND_ROUTES
    + RESULTS
    + HANDLER_INPUTS
    + MANAGEMENT
    + METRICS
    + UNSERVED
    + DESCRIBE_CUSTOMIZED
    + UNREGISTER_DURING_INFERENCE
    + SEQUENCES
    + CONTINUOUS
)
