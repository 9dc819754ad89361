"""`dllama-mpi api`: an OpenAI-compatible HTTP server on rank 0 (starlette + uvicorn).

Threads on the root: the main thread is the generation thread, the only one that touches the
engine (and so MPI); uvicorn runs its asyncio loop in a second thread. A request is validated and
tokenized on the asyncio side, then queued as a `Job`; the generation thread hands jobs in arrival
order to the scheduler, which decodes up to --parallel of them together (continuous batching), and
sends each job's pieces back through the loop (`call_soon_threadsafe`). A job whose client went
away is flagged; its sequence ends at the next pass and its pages are freed, the others go on.
Workers follow `Engine.serve()` and ignore SIGINT/SIGTERM (mpiexec forwards both to every rank):
the root stops them on shutdown.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import queue
import signal
import threading
import time
import uuid
from dataclasses import dataclass, field

import click

from .startup import log, model_options, sampling_options, spec_config, spec_options, spmd, start
from .tools import CallParser, ToolError, message_of, parse_tool_message

ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_STOPS = 4
MAX_DRAFT = 256   # speculative.n_max / n_min of a request



class ApiError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 type_: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type_

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


@dataclass
class Job:
    prompt_text: str | None      # rendered chat prompt (None for /v1/completions)
    prompt_ids: list
    max_tokens: int
    temperature: float
    top_p: float
    seed: int | None
    stop: list
    loop: asyncio.AbstractEventLoop
    out: asyncio.Queue
    cancel: threading.Event = field(default_factory=threading.Event)
    n: int = 1                       # choices
    logprobs: int | None = None      # top alternatives per token, None: no log-probabilities
    echo: bool = False               # /v1/completions: the prompt's own log-probabilities too
    grammar: object = None           # grammar.Grammar of response_format (None: free text)
    draft: tuple | None = None       # (speculative.n_max, n_min, p_min) of the request, any may be None
    generated: dict = field(default_factory=dict)   # choice -> token ids

    def send(self, item) -> None:
        try:
            self.loop.call_soon_threadsafe(self.out.put_nowait, item)
        except RuntimeError:   # the loop is closed (shutdown)
            pass


# ------------------------------------------------------------------------------------------------
# request validation (pure functions, tested without a model)

def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def parse_common(body: dict, max_seq_len: int, defaults: dict, max_n: int = 8, chat: bool = True) -> dict:
    """Sampling and limit parameters of both endpoints (`chat`: /v1/chat/completions, else
    /v1/completions, which differ in how log-probabilities are asked for)."""
    out = {}
    n = body.get("n")
    if n is None:
        n = 1
    elif not _is_int(n) or not 1 <= n <= max_n:
        raise ApiError(400, f"'n' must be an integer from 1 to {max_n} (--max-n)", "n")
    out["n"] = n
    if chat:
        lp, top = body.get("logprobs"), body.get("top_logprobs")
        if lp is not None and not isinstance(lp, bool):
            raise ApiError(400, "'logprobs' must be a boolean", "logprobs")
        if top is not None and (not _is_int(top) or not 0 <= top <= 20):
            raise ApiError(400, "'top_logprobs' must be an integer from 0 to 20", "top_logprobs")
        if top is not None and not lp:
            raise ApiError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
        out["logprobs"] = (top or 0) if lp else None
        out["echo"] = False
    else:
        lp, echo = body.get("logprobs"), body.get("echo")
        if lp is not None and (not _is_int(lp) or not 0 <= lp <= 5):
            raise ApiError(400, "'logprobs' must be an integer from 0 to 5", "logprobs")
        if echo is not None and not isinstance(echo, bool):
            raise ApiError(400, "'echo' must be a boolean", "echo")
        out["logprobs"], out["echo"] = lp, bool(echo)
    as_ids = body.get("return_tokens_as_token_ids")   # vLLM's extension: tokens as "token_id:N"
    if as_ids is not None and not isinstance(as_ids, bool):
        raise ApiError(400, "'return_tokens_as_token_ids' must be a boolean", "return_tokens_as_token_ids")
    out["token_ids"] = bool(as_ids)
    stream = body.get("stream", False)
    if stream is not None and not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be a boolean", "stream")
    out["stream"] = bool(stream)
    so = body.get("stream_options")
    if so is not None and not isinstance(so, dict):
        raise ApiError(400, "'stream_options' must be an object", "stream_options")
    out["include_usage"] = bool(so and so.get("include_usage"))
    mt = None
    for key in ("max_completion_tokens", "max_tokens"):
        v = body.get(key)
        if v is None:
            continue
        if not _is_int(v):
            raise ApiError(400, f"'{key}' must be an integer", key)
        if v < 1 and not (v == 0 and out["echo"]):   # 0 with echo: score the prompt, generate nothing
            raise ApiError(400, f"'{key}' must be at least 1, got {v}", key)
        if v > max_seq_len:
            raise ApiError(400, f"'{key}' is {v}, more than the model's context ({max_seq_len} tokens)", key,
                           "context_length_exceeded")
        mt = v if mt is None else mt
    out["max_tokens"] = mt
    t = body.get("temperature")
    if t is None:
        t = defaults["temperature"]
    elif not _is_num(t) or not 0 <= t <= 2:
        raise ApiError(400, "'temperature' must be a number between 0 and 2", "temperature")
    out["temperature"] = float(t)
    p = body.get("top_p")
    if p is None:
        p = defaults["top_p"]
    elif not _is_num(p) or not 0 <= p <= 1:
        raise ApiError(400, "'top_p' must be a number between 0 and 1", "top_p")
    out["top_p"] = float(p)
    seed = body.get("seed")
    if seed is not None and not _is_int(seed):
        raise ApiError(400, "'seed' must be an integer", "seed")
    out["seed"] = seed if seed is not None else defaults.get("seed")
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    elif isinstance(stop, list) and all(isinstance(s, str) for s in stop):
        if len(stop) > MAX_STOPS:
            raise ApiError(400, f"'stop' has {len(stop)} strings; at most {MAX_STOPS} are allowed", "stop")
    else:
        raise ApiError(400, "'stop' must be a string or a list of strings", "stop")
    out["stop"] = [s for s in stop if s]
    draft = [body.get("speculative.n_max"), body.get("speculative.n_min")]   # llama.cpp server's names
    for i, key in enumerate(("speculative.n_max", "speculative.n_min")):
        if draft[i] is not None and (not _is_int(draft[i]) or not 0 <= draft[i] <= MAX_DRAFT):
            raise ApiError(400, f"'{key}' must be an integer from 0 to {MAX_DRAFT}", key)
    if None not in draft and draft[0] and draft[1] > draft[0]:
        raise ApiError(400, "'speculative.n_min' must not exceed 'speculative.n_max'", "speculative.n_min")
    p_min = body.get("speculative.p_min")
    if p_min is not None and (not _is_num(p_min) or not 0 <= p_min <= 1):
        raise ApiError(400, "'speculative.p_min' must be a number from 0 to 1", "speculative.p_min")
    draft.append(p_min)
    out["draft"] = None if draft == [None, None, None] else tuple(draft)
    return out


def parse_response_format(body: dict) -> dict | None:
    """The request's response_format ({type: text | json_object | json_schema}; vLLM's `guided_json`
    schema is read as a json_schema one), None when it asks for none. Checked by grammar.schema_of."""
    rf, guided = body.get("response_format"), body.get("guided_json")
    if rf is None and guided is not None:
        if isinstance(guided, str):
            try:
                guided = json.loads(guided)
            except ValueError as e:
                raise ApiError(400, f"'guided_json' is not JSON: {e}", "guided_json") from None
        rf = {"type": "json_schema", "json_schema": {"name": "guided_json", "schema": guided}}
    if rf is None or (isinstance(rf, dict) and rf.get("type") == "text"):
        return None
    return rf


def parse_messages(body: dict) -> list[dict]:
    msgs = body.get("messages")
    if msgs is None:
        raise ApiError(400, "'messages' is required", "messages")
    if not isinstance(msgs, list):
        raise ApiError(400, "'messages' must be a list", "messages")
    if not msgs:
        raise ApiError(400, "'messages' must not be empty", "messages")
    out = []
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise ApiError(400, f"messages[{i}] must be an object", f"messages[{i}]")
        role = m.get("role")
        if role not in ROLES:
            raise ApiError(400, f"messages[{i}].role must be one of {', '.join(ROLES)}, got {role!r}",
                           f"messages[{i}].role")
        content = m.get("content")
        if isinstance(content, list):   # content parts: text only
            texts = []
            for part in content:
                if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                    raise ApiError(400, f"messages[{i}].content: only text parts are supported",
                                   f"messages[{i}].content")
                texts.append(part["text"])
            content = "".join(texts)
        if content is None and role == "assistant":
            content = ""
        if content is None and role == "tool":
            content = ""
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{i}].content must be a string or a list of text parts",
                           f"messages[{i}].content")
        msg = {"role": "system" if role == "developer" else role, "content": content}
        try:
            parse_tool_message(i, m, msg)   # an assistant's tool_calls, a tool result's tool_call_id
        except ToolError as e:
            raise ApiError(400, str(e), e.param) from None
        out.append(msg)
    return out


def parse_prompt(body: dict) -> str:
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], str):
        p = p[0]
    if not isinstance(p, str):
        raise ApiError(400, "'prompt' must be a string (one prompt per request)", "prompt")
    if not p:
        raise ApiError(400, "'prompt' must not be empty", "prompt")
    return p


# ------------------------------------------------------------------------------------------------
# the app

class Server:
    def __init__(self, engine, tokenizer, model_id: str, template, defaults: dict, api_key: str | None,
                 max_body_bytes: int, cors_origins: list[str], web_ui: bool = True, max_n: int = 8, spec=None):
        from .metrics import RankStats
        from .scheduler import Scheduler

        from .grammar import Grammars

        self.engine = engine
        self.scheduler = Scheduler(engine, tokenizer, spec=spec)
        from .metrics import engine_kv_bytes_per_token

        per_token = engine_kv_bytes_per_token(engine)
        self.init_front(tokenizer, model_id, template, defaults, api_key, max_body_bytes, cors_origins, web_ui,
                        max_n, engine.max_seq_len, engine.kv_plan, per_token,
                        RankStats(engine.gather_rank_stats, engine.RANK_STATS))
        self.grammars = Grammars(tokenizer, engine.h.vocab_size)

    def init_front(self, tokenizer, model_id, template, defaults, api_key, max_body_bytes, cors_origins, web_ui,
                   max_n: int, max_seq_len: int, kv_plan, kv_bytes_per_token: list[int], rank_stats) -> None:
        """The HTTP side: what validation, responses, /health and /metrics need. Shared with
        `serve`'s supervisor (serve.Supervisor), whose numbers come from its MPI backend."""
        from .chat import PromptHistory
        from .metrics import Metrics

        self.tokenizer = tokenizer
        self.grammars = None   # grammar.Grammars: response_format and tools (Server and Supervisor set it)
        self.model_id = model_id
        self.template = template
        self.defaults = defaults
        self.api_key = api_key
        self.max_body_bytes = max_body_bytes
        self.cors_origins = cors_origins
        self.max_n = max_n
        self.max_seq_len, self.kv_plan, self.kv_bytes_per_token = max_seq_len, kv_plan, kv_bytes_per_token
        # one recent conversation per sequence slot, and then some (a turn's prompt extends it)
        self.history = PromptHistory(tokenizer, capacity=4 * kv_plan.n_slots)
        self.jobs: queue.Queue = queue.Queue()
        self.stopping = threading.Event()
        self.created = int(time.time())
        self.served = 0
        self.last: dict | None = None   # counts of the last generation (no request data), for /health
        self.web = web_assets() if web_ui else None
        self.metrics = Metrics()
        self.rank_stats = rank_stats
        self.metrics.set_rank_stats(self.rank_stats)
        self._register_gauges()

    def gauges(self) -> dict:
        """The scheduler's numbers (Scheduler.gauges) for /health and /metrics."""
        return self.scheduler.gauges()

    def _register_gauges(self) -> None:
        m, g = self.metrics, self.gauges
        # plan and bytes are read at scrape time: serve's backend may come back with another rank count
        used = lambda: g()["kv_pages_in_use"] * self.kv_plan.page_size  # noqa: E731 (positions of held pages)
        m.gauge("queue_depth", "Requests waiting for a sequence slot or KV pages",
                lambda: self.jobs.qsize() + g()["waiting"])
        m.gauge("running_sequences", "Sequences being generated", lambda: g()["running"])
        m.gauge("kv_cache_capacity_tokens", "Positions the KV page pool holds", lambda: self.kv_plan.n_tokens)
        m.gauge("kv_cache_used_tokens", "Positions of the pages running sequences hold", used)
        m.gauge("kv_cache_pages", "KV pages by state: held by sequences, cached (reusable prefixes, evicted "
                "when needed), free", lambda: {("in_use",): g()["kv_pages_in_use"], ("cached",): g()["kv_pages_cached"],
                                               ("free",): g()["kv_pages_free"]}, ("state",))
        m.gauge("sampled_rows", "Sampled top-p rows since the engine started, by how the root got them: from "
                "the ranks' summaries (no vocabulary slice sent) or gathered whole (a nucleus past the summaries; "
                "one rank; pipeline stages)", lambda: {("summaries",): g()["sampled_rows_summarised"],
                                                      ("whole",): g()["sampled_rows_whole"]}, ("way",))
        m.gauge("kv_cache_used_bytes", "KV-cache bytes held by running sequences, per rank", lambda: {
            (r,): used() * b for r, b in enumerate(self.kv_bytes_per_token)}, ("rank",))
        m.gauge("kv_cache_free_bytes", "KV-cache bytes free or reclaimable (cached prefixes), per rank", lambda: {
            (r,): (self.kv_plan.n_tokens - used()) * b for r, b in enumerate(self.kv_bytes_per_token)}, ("rank",))

    # --- the generation thread (main thread: the only one that calls the engine) ---------------

    def run_jobs(self) -> None:
        sched = self.scheduler
        while not self.stopping.is_set():
            self._take_jobs(block=not sched.busy)
            self.rank_stats.poll()   # between passes: a /metrics scrape may be waiting
            if sched.busy:
                sched.step()
        sched.abort_all()
        self.refuse_queued()

    def queued_jobs(self, block: bool):
        """The queued jobs, oldest first, without those whose client went away (waiting up to 0.1 s
        for the first one when `block`)."""
        while True:
            try:
                job = self.jobs.get(timeout=0.1) if block else self.jobs.get_nowait()
            except queue.Empty:
                return
            block = False
            if not job.cancel.is_set():
                yield job

    def refuse_queued(self) -> None:
        """Shutdown: answer whatever is still queued."""
        for job in self.queued_jobs(block=False):
            job.send(("error", ApiError(503, "the server is shutting down", type_="server_error")))

    def _take_jobs(self, block: bool) -> None:
        """Hand the queued jobs to the scheduler (waiting up to 0.1 s for one when idle)."""
        from .sampler import Sampler
        from .scheduler import Request, RequestError

        for job in self.queued_jobs(block):
            # n choices: n samplers, reproducible with a seed (choice i draws with seed + i)
            seeds = [job.seed + i if job.seed is not None else
                     (None if job.n == 1 else int.from_bytes(os.urandom(4), "little")) for i in range(job.n)]
            reqs = [Request(job.prompt_ids, job.max_tokens,
                            Sampler(self.tokenizer.vocab_size, job.temperature, job.top_p, seeds[i]), job.stop,
                            cancelled_by=job.cancel, logprobs=job.logprobs,
                            prompt_logprobs=job.echo and job.logprobs is not None and i == 0,
                            grammar=job.grammar.matcher() if job.grammar is not None else None,
                            spec=self.scheduler.spec.with_draft(*job.draft) if job.draft else None)
                    for i in range(job.n)]
            for i, r in enumerate(reqs):
                r.sink = lambda kind, value, job=job, i=i, r=r: self._on_event(job, i, r, kind, value)
            reqs[0].followers = reqs[1:]   # they share its prompt's pages and logits
            try:
                self.scheduler.submit(reqs[0])
            except RequestError as e:
                job.send(("error", ApiError(400, str(e), None, "context_length_exceeded")))

    def _on_event(self, job: Job, choice: int, req, kind: str, value) -> None:
        if kind == "piece":
            gen = job.generated.setdefault(choice, [])
            gen.append(value.token)
            if job.echo and len(gen) == 1:   # the prompt is evaluated: its part of the answer comes first
                job.send(("prompt", choice, req.prompt_logprobs))
            if value.text or value.logprob is not None:
                job.send(("piece", choice, value))
            return
        st = value
        generated = job.generated.get(choice, [])
        ended_on_eos = bool(generated) and generated[-1] in self.tokenizer.eos_ids
        if job.prompt_text is not None and job.n == 1 and st.finish_reason != "abort" and \
                (st.finish_reason != "stop" or ended_on_eos):
            self.history.record(job.prompt_text, job.prompt_ids, generated)
        # (a completion, or an answer cut by a stop string: its text is not its tokens; not recorded)
        self.served += 1
        self.metrics.generation_done(st)
        self.last = {"finish_reason": st.finish_reason, "prompt_tokens": st.prompt_tokens,
                     "evaluated_prompt_tokens": st.evaluated_prompt_tokens,
                     "generated_tokens": st.generated_tokens}
        job.send(("done", choice, (st, req.prompt_logprobs)))

    # --- the asyncio side ---------------------------------------------------------------------

    def build_app(self):
        from starlette.applications import Starlette
        from starlette.middleware import Middleware
        from starlette.middleware.cors import CORSMiddleware
        from starlette.responses import JSONResponse, Response
        from starlette.routing import Route

        def error_response(e: ApiError):
            headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
            return JSONResponse(e.body(), status_code=e.status, headers=headers)

        def guarded(handler, auth=True):
            async def endpoint(request):
                try:
                    if auth:
                        self.check_auth(request)
                    return await handler(request)
                except ApiError as e:
                    return error_response(e)
            return endpoint

        async def health(request):
            return JSONResponse(self.health())

        async def models(request):
            return JSONResponse({"object": "list", "data": [self.model_card()]})

        async def model(request):
            if request.path_params["name"] != self.model_id:
                raise ApiError(404, f"the model '{request.path_params['name']}' does not exist", "model",
                               "model_not_found")
            return JSONResponse(self.model_card())

        async def metrics(request):
            from .metrics import CONTENT_TYPE

            return Response(await self.metrics.render(), media_type=CONTENT_TYPE)

        async def page(request):
            name = request.path_params.get("name", "index.html")
            if name not in self.web:
                raise ApiError(404, f"GET {request.url.path}: Not Found")
            body, media_type = self.web[name]
            return Response(body, media_type=media_type, headers=WEB_HEADERS)

        async def not_found(request, exc):
            return error_response(ApiError(404 if exc.status_code == 404 else exc.status_code,
                                           f"{request.method} {request.url.path}: {exc.detail}"))

        middleware = [Middleware(CountRequests, metrics=self.metrics)]
        if self.cors_origins:
            middleware.append(Middleware(CORSMiddleware, allow_origins=self.cors_origins, allow_methods=["*"],
                                         allow_headers=["*"]))
        routes = [
            Route("/health", guarded(health, auth=False), methods=["GET"]),
            Route("/v1/models", guarded(models), methods=["GET"]),
            Route("/v1/models/{name:path}", guarded(model), methods=["GET"]),
            Route("/v1/chat/completions", guarded(self.chat_completions), methods=["POST"]),
            Route("/v1/completions", guarded(self.completions), methods=["POST"]),
            Route("/metrics", guarded(metrics), methods=["GET"]),
        ]
        if self.web is not None:   # the chat page and its assets load without the key; its API calls send it
            routes += [Route("/", guarded(page, auth=False), methods=["GET"]),
                       Route("/web/{name}", guarded(page, auth=False), methods=["GET"])]
        from starlette.exceptions import HTTPException

        return Starlette(routes=routes, middleware=middleware, exception_handlers={HTTPException: not_found})

    def health(self) -> dict:
        g = self.gauges()
        return {"status": "ok", "model": self.model_id,
                "queued": self.jobs.qsize() + g["waiting"], "running": g["running"],
                "kv_pages": {"total": g["kv_pages_total"], "in_use": g["kv_pages_in_use"],
                             "cached": g["kv_pages_cached"], "page_size": g["kv_page_size"]},
                "waited_for_pages": g["waited_for_pages"],
                "served": self.served, "last": self.last}

    def model_card(self) -> dict:
        return {"id": self.model_id, "object": "model", "created": self.created, "owned_by": "dllama-mpi",
                "context_length": self.max_seq_len}

    def check_auth(self, request) -> None:
        if not self.api_key:
            return
        h = request.headers.get("authorization", "")
        scheme, _, token = h.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), self.api_key.encode()):
            raise ApiError(401, "invalid or missing API key (send 'Authorization: Bearer <key>')", None,
                           "invalid_api_key")

    async def read_json(self, request) -> dict:
        cl = request.headers.get("content-length")
        if cl is not None:
            try:
                if int(cl) > self.max_body_bytes:
                    raise ApiError(413, f"request body is larger than {self.max_body_bytes} bytes", None,
                                   "request_too_large")
            except ValueError:
                raise ApiError(400, "bad Content-Length header") from None
        chunks, size = [], 0
        async for chunk in request.stream():
            size += len(chunk)
            if size > self.max_body_bytes:
                raise ApiError(413, f"request body is larger than {self.max_body_bytes} bytes", None,
                               "request_too_large")
            chunks.append(chunk)
        try:
            body = json.loads(b"".join(chunks))
        except (ValueError, UnicodeDecodeError) as e:
            raise ApiError(400, f"the request body is not valid JSON: {e}") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        m = body.get("model")
        if m is not None and not isinstance(m, str):
            raise ApiError(400, "'model' must be a string", "model")
        if m and m != self.model_id:
            raise ApiError(404, f"the model '{m}' does not exist; this server runs '{self.model_id}'", "model",
                           "model_not_found")
        return body

    def limits(self, params: dict, n_prompt: int) -> int:
        from .scheduler import RequestError, check_request

        ctx = self.max_seq_len
        if n_prompt >= ctx:
            raise ApiError(400, f"the prompt is {n_prompt} tokens; the model's context is {ctx} tokens", "messages",
                           "context_length_exceeded")
        mt = params["max_tokens"]
        room = ctx - n_prompt + 1   # the first token needs no forward pass
        if mt is not None and mt > room:
            raise ApiError(400, f"this model's context is {ctx} tokens; the request needs {n_prompt + mt} "
                                f"({n_prompt} in the prompt, {mt} to generate)", "max_tokens",
                           "context_length_exceeded")
        mt = room if mt is None else mt
        try:   # a request the KV pool could never hold is refused now rather than queued forever
            check_request(self.kv_plan, ctx, n_prompt, mt)
        except RequestError as e:
            if params["max_tokens"] is not None:
                raise ApiError(400, str(e), "max_tokens", "context_length_exceeded") from None
            # no max_tokens asked: generate what the pool can hold
            plan = self.kv_plan
            mt = min(plan.n_pages, plan.table_stride) * plan.page_size - n_prompt + 1
            if mt < 1:
                raise ApiError(400, str(e), "messages", "context_length_exceeded") from None
        return mt

    async def chat_completions(self, request):
        from .errors import TemplateError

        from .tools import compile_grammar, format_for, parse_tools, prompt_messages

        body = await self.read_json(request)
        params = parse_common(body, self.max_seq_len, self.defaults, self.max_n, chat=True)
        messages = parse_messages(body)
        try:
            tools = parse_tools(body)
        except ToolError as e:
            raise ApiError(400, str(e), e.param) from None
        if tools is not None and parse_response_format(body) is not None:
            raise ApiError(400, "'response_format' and 'tools' cannot be used together (unless 'tool_choice' is "
                                "'none')", "response_format")
        fmt = format_for(self.template)
        messages, variables = prompt_messages(fmt, messages, tools)
        try:
            text = self.template.render(messages, add_generation_prompt=True, **variables)
        except TemplateError as e:
            raise ApiError(400, str(e), "messages") from None
        ids = self.history.encode(text)
        if tools is not None:
            params["grammar"] = await self.compiled("tools", compile_grammar, self.grammars, fmt, tools)
            params["tools"] = fmt
        else:
            params["grammar"] = await self.grammar(body)
        return await self.respond(request, params, text, ids, chat=True)

    async def completions(self, request):
        body = await self.read_json(request)
        params = parse_common(body, self.max_seq_len, self.defaults, self.max_n, chat=False)
        prompt = parse_prompt(body)
        ids = self.tokenizer.encode(prompt)
        params["grammar"] = await self.grammar(body)
        return await self.respond(request, params, None, ids, chat=False)

    async def grammar(self, body: dict):
        """The compiled grammar of the request's response_format (None: free text), or a 400 naming
        what cannot be compiled, before the request is queued. Compiled on a worker thread (under
        grammar.py's caps), so that a large schema does not hold up other requests."""
        rf = parse_response_format(body)
        if rf is None:
            return None
        return await self.compiled("response_format", lambda: self.grammars.compile(rf))

    async def compiled(self, param: str, fn, *args):
        """fn(*args) (a grammar compilation) on a worker thread; a GrammarError is a 400 naming `param`."""
        from .grammar import GrammarError

        try:
            return await asyncio.get_running_loop().run_in_executor(None, fn, *args)
        except GrammarError as e:
            raise ApiError(400, str(e), param, f"invalid_{param}") from None

    def token_str(self, tid: int, as_id: bool = False) -> tuple[str, list[int]]:
        """A token's text (bytes that are not UTF-8 on their own show as U+FFFD) and its bytes;
        as_id: "token_id:N" (vLLM's return_tokens_as_token_ids), for clients that need the ids."""
        b = self.tokenizer.token_bytes(tid)
        return (f"token_id:{tid}" if as_id else b.decode("utf-8", errors="replace")), list(b)

    def chat_logprob(self, lp, as_id: bool = False) -> dict:
        """One token of `choices[].logprobs.content` (OpenAI's chat shape)."""
        tok, b = self.token_str(lp.token, as_id)
        return {"token": tok, "logprob": lp.logprob, "bytes": b,
                "top_logprobs": [{"token": t, "logprob": v, "bytes": tb}
                                 for (t, tb), v in ((self.token_str(i, as_id), v) for i, v in lp.top)]}

    def completion_logprobs(self, entries, offset0: int, as_id: bool = False) -> dict:
        """/v1/completions' shape for [(token id, TokenLogprob or None for an unscored first prompt
        token)]: tokens, token_logprobs, top_logprobs, text_offset (from offset0 in the choice's text)."""
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        off = offset0
        for tid, lp in entries:
            text = self.token_str(tid)[0]
            out["tokens"].append(self.token_str(tid, as_id)[0])
            out["token_logprobs"].append(None if lp is None else lp.logprob)
            out["top_logprobs"].append(None if lp is None else {self.token_str(i, as_id)[0]: v for i, v in lp.top})
            out["text_offset"].append(off)
            off += len(text)
        return out

    async def respond(self, request, params, text, ids, chat: bool):
        from starlette.responses import JSONResponse, StreamingResponse

        max_tokens = self.limits(params, len(ids))
        if self.stopping.is_set():
            raise ApiError(503, "the server is shutting down", type_="server_error")
        loop = asyncio.get_running_loop()
        n, want_lp, echo, as_id = params["n"], params["logprobs"], params["echo"], params["token_ids"]
        job = Job(text, ids, max_tokens, params["temperature"], params["top_p"], params["seed"], params["stop"],
                  loop, asyncio.Queue(), n=n, logprobs=want_lp, echo=echo, grammar=params.get("grammar"),
                  draft=params.get("draft"))
        self.jobs.put(job)
        rid = ("chatcmpl-" if chat else "cmpl-") + uuid.uuid4().hex[:24]
        created = int(time.time())
        obj = "chat.completion" if chat else "text_completion"
        prompt_text = "" if chat else self.tokenizer.decode(ids)

        def usage(stats) -> dict:
            st = stats[0]
            gen = sum(x.generated_tokens for x in stats)
            return {"prompt_tokens": st.prompt_tokens, "completion_tokens": gen,
                    "total_tokens": st.prompt_tokens + gen,
                    "prompt_tokens_details": {"cached_tokens": st.prompt_tokens - st.evaluated_prompt_tokens},
                    "evaluated_prompt_tokens": st.evaluated_prompt_tokens}

        tool_format = params.get("tools")   # tools.ToolFormat: answers are parsed into text and calls

        def finish(st, parser=None) -> str:
            if st.finish_reason != "stop":
                return "length"
            return "tool_calls" if parser is not None and parser.calls else "stop"

        def echo_part(prompt_lps):
            """The prompt's text and (with logprobs) its tokens' log-probabilities, first one unscored."""
            if want_lp is None:
                return prompt_text, None
            lps = prompt_lps or [None] * len(ids)
            return prompt_text, self.completion_logprobs(list(zip(ids, lps)), 0, as_id)

        if not params["stream"]:
            texts = {i: [] for i in range(n)}
            lps = {i: [] for i in range(n)}
            done = {}
            try:
                while len(done) < n:
                    try:
                        item = await asyncio.wait_for(job.out.get(), timeout=0.5)
                    except asyncio.TimeoutError:
                        if await request.is_disconnected():
                            job.cancel.set()
                            return JSONResponse({}, status_code=499)
                        continue
                    if item[0] == "error":
                        raise item[1]
                    kind, i, val = item
                    if kind == "piece":
                        texts[i].append(val.text)
                        if val.logprob is not None:
                            lps[i].append(val.logprob)
                    elif kind == "done":
                        done[i] = val
            finally:
                job.cancel.set()   # no-op once done; stops the generation if this task is cancelled
            choices = []
            for i in range(n):
                st, prompt_lps = done[i]
                content = "".join(texts[i])
                if chat:
                    message, parser = {"role": "assistant", "content": content}, None
                    if tool_format is not None:
                        parser = CallParser(tool_format)
                        parser.push(content)
                        parser.finish()
                        message = message_of(parser)
                    choices.append({"index": i, "message": message,
                                    "logprobs": None if want_lp is None else
                                    {"content": [self.chat_logprob(x, as_id) for x in lps[i]]},
                                    "finish_reason": finish(st, parser)})
                    continue
                head, head_lp = echo_part(prompt_lps) if echo else ("", None)
                lp = None
                if want_lp is not None:
                    lp = self.completion_logprobs([(x.token, x) for x in lps[i]], len(head), as_id)
                    if head_lp is not None:
                        lp = {k: head_lp[k] + lp[k] for k in lp}
                choices.append({"index": i, "text": head + content, "logprobs": lp, "finish_reason": finish(st)})
            return JSONResponse({"id": rid, "object": obj, "created": created, "model": self.model_id,
                                 "system_fingerprint": None, "choices": choices,
                                 "usage": usage([done[i][0] for i in range(n)])})

        chunk_obj = "chat.completion.chunk" if chat else "text_completion"

        def chunk(i=0, delta=None, text=None, finish_reason=None, stats=None, no_choices=False, lp=None) -> str:
            d = {"id": rid, "object": chunk_obj, "created": created, "model": self.model_id,
                 "system_fingerprint": None}
            if no_choices:
                d["choices"] = []
            elif chat:
                d["choices"] = [{"index": i, "delta": delta or {}, "logprobs": lp, "finish_reason": finish_reason}]
            else:
                d["choices"] = [{"index": i, "text": text or "", "logprobs": lp, "finish_reason": finish_reason}]
            if stats is not None:
                d["usage"] = usage(stats)
            return "data: " + json.dumps(d, ensure_ascii=False) + "\n\n"

        def tool_chunks(i, events, lp):
            """Chunks of a parser's events (tools.CallParser): text as content; a call's first delta
            with its index, id, type and name, then its arguments' fragments (as the openai client's
            stream helpers expect). The piece's log-probabilities go with the first."""
            out = []
            for ev in events:
                if ev[0] == "content":
                    delta = {"content": ev[1]}
                elif ev[0] == "call":
                    delta = {"tool_calls": [{"index": ev[1], "id": ev[2], "type": "function",
                                             "function": {"name": ev[3], "arguments": ""}}]}
                else:
                    delta = {"tool_calls": [{"index": ev[1], "function": {"arguments": ev[2]}}]}
                out.append(chunk(i, delta=delta, lp=lp))
                lp = None
            if lp is not None:
                out.append(chunk(i, delta={}, lp=lp))
            return out

        async def events():
            try:
                parsers = [CallParser(tool_format) for _ in range(n)] if tool_format is not None else None
                offsets = [0] * n
                if chat:
                    for i in range(n):
                        yield chunk(i, delta={"role": "assistant", "content": ""})
                done = {}
                while len(done) < n:
                    item = await job.out.get()
                    if item[0] == "error":
                        yield "data: " + json.dumps(item[1].body()) + "\n\n"
                        break
                    kind, i, val = item
                    if kind == "prompt" or (kind == "done" and echo and offsets[i] == 0):
                        # echo: the prompt's text (and scores) before the choice's first token
                        head, head_lp = echo_part(val if kind == "prompt" else val[1])
                        yield chunk(i, text=head, lp=head_lp)
                        offsets[i] = len(head)
                    if kind == "piece":
                        lp = None
                        if val.logprob is not None:
                            lp = {"content": [self.chat_logprob(val.logprob, as_id)]} if chat else \
                                self.completion_logprobs([(val.token, val.logprob)], offsets[i], as_id)
                        if parsers is not None:
                            for c in tool_chunks(i, parsers[i].push(val.text), lp):
                                yield c
                        else:
                            yield chunk(i, delta={"content": val.text}, text=val.text, lp=lp)
                        offsets[i] += len(val.text)
                    elif kind == "done":
                        done[i] = val[0]
                        if parsers is not None:
                            for c in tool_chunks(i, parsers[i].finish(), None):
                                yield c
                        yield chunk(i, delta={}, finish_reason=finish(val[0], parsers[i] if parsers else None))
                if len(done) == n and params["include_usage"]:
                    yield chunk(stats=[done[i] for i in range(n)], no_choices=True)
                yield "data: [DONE]\n\n"
            finally:
                job.cancel.set()   # the client went away (task cancelled) or we are done

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


# ------------------------------------------------------------------------------------------------
# the chat page and request counting

WEB_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
             ".css": "text/css; charset=utf-8", ".svg": "image/svg+xml"}
# The page runs only its own script and talks only to this server: model text can never become markup
# (the script writes it with textContent), and this policy would block an injected script anyway.
WEB_HEADERS = {"Content-Security-Policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
                                          "img-src 'self' data:; connect-src 'self'; base-uri 'none'; "
                                          "form-action 'none'; frame-ancestors 'none'",
               "X-Content-Type-Options": "nosniff", "Cache-Control": "no-cache"}


def web_assets() -> dict[str, tuple[bytes, str]]:
    """The chat page's files (package data in dllama_mpi/web/), read once: name -> (bytes, type)."""
    from importlib.resources import files

    out = {}
    for f in files("dllama_mpi").joinpath("web").iterdir():
        ext = os.path.splitext(f.name)[1]
        if ext in WEB_TYPES:
            out[f.name] = (f.read_bytes(), WEB_TYPES[ext])
    if "index.html" not in out:
        from .errors import ConfigError

        raise ConfigError("the chat page (dllama_mpi/web/index.html) is missing from the installation; "
                          "reinstall, or run with --no-web-ui")
    return out


ENDPOINTS = ("/", "/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions")


def endpoint_label(path: str) -> str:
    """The `endpoint` label of a request: its route, never the raw path (bounded label values)."""
    if path in ENDPOINTS:
        return path
    if path.startswith("/v1/models/"):
        return "/v1/models/{name}"
    if path.startswith("/web/"):
        return "/web/{name}"
    return "other"


class CountRequests:
    """ASGI middleware: counts every HTTP response by endpoint and status when it starts."""

    def __init__(self, app, metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = False

        async def counting_send(message):
            nonlocal started
            if message["type"] == "http.response.start" and not started:
                started = True
                self.metrics.request_done(endpoint_label(scope["path"]), message["status"])
            await send(message)

        try:
            await self.app(scope, receive, counting_send)
        finally:
            if not started:   # cancelled or failed before answering
                self.metrics.request_done(endpoint_label(scope["path"]), 499)


# ------------------------------------------------------------------------------------------------

def serve_http(server: Server, host: str, port: int, verbose: bool) -> None:
    """Run uvicorn in a thread and the generation loop here until SIGTERM/SIGINT."""
    import uvicorn

    config = uvicorn.Config(server.build_app(), host=host, port=port, log_level="info" if verbose else "warning",
                            access_log=verbose, lifespan="off", timeout_graceful_shutdown=2)
    http = uvicorn.Server(config)
    failed = []

    def run_http():
        try:
            http.run()
        except BaseException as e:  # noqa: BLE001
            failed.append(e)
        finally:
            if not http.started:
                failed.append(RuntimeError(f"could not listen on {host}:{port}"))
            server.stopping.set()

    def on_signal(signum, frame):
        server.stopping.set()

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, on_signal)
    t = threading.Thread(target=run_http, name="http", daemon=True)
    t.start()
    while not http.started and not server.stopping.is_set():
        time.sleep(0.02)
    if http.started:
        log(f"listening on http://{host}:{port} (model '{server.model_id}', context {server.max_seq_len})"
            + (f"; chat page at http://{host}:{port}/" if server.web is not None else ""))
    server.run_jobs()
    http.should_exit = True
    t.join(timeout=10)
    if failed and not http.started:
        from .errors import ConfigError

        raise ConfigError(f"could not start the HTTP server on {host}:{port} (port in use?)")
    log(f"stopped after {server.served} request(s)")


def server_options(fn):
    """The HTTP server's options, shared by `api` and `serve`."""
    opts = [
        click.option("--parallel", type=int, default=4, show_default=True,
                     help="Requests decoded together (continuous batching); more wait in a queue."),
        click.option("--max-n", type=int, default=8, show_default=True,
                     help="Most choices one request may ask for ('n'); they share the prompt's KV pages."),
        click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on."),
        click.option("--port", type=int, default=9990, show_default=True, help="TCP port to listen on."),
        click.option("--api-key", default=None, envvar="DLLAMA_API_KEY",
                     help="Require 'Authorization: Bearer KEY' on every endpoint but /health (env DLLAMA_API_KEY)."),
        click.option("--max-body-bytes", type=int, default=1 << 20, show_default=True, help="Largest request body."),
        click.option("--cors-origin", multiple=True, help="Allow browser pages from this origin (repeatable; * for any)."),
        click.option("--chat-template", default=None,
                     help="Override the tokenizer's chat template: a built-in name or Jinja source."),
        click.option("--model-name", default=None, help="Model id served by /v1/models [default: the model file's name]."),
        click.option("--verbose", is_flag=True, help="Log every request (uvicorn access log)."),
        click.option("--no-web-ui", "no_web_ui", is_flag=True, help="Do not serve the chat page at /."),
    ]
    for o in reversed(opts):
        fn = o(fn)
    return fn


def check_server_options(port: int, max_body_bytes: int, max_n: int) -> None:
    from .errors import ConfigError

    if not 0 < port < 65536:
        raise ConfigError(f"--port must be in 1..65535, got {port}")
    if max_body_bytes < 1:
        raise ConfigError(f"--max-body-bytes must be >= 1, got {max_body_bytes}")
    if max_n < 1:
        raise ConfigError(f"--max-n must be >= 1, got {max_n}")


def register(group) -> None:
    """Add `api` to the CLI group."""

    @click.command()
    @model_options
    @sampling_options
    @spec_options
    @server_options
    @click.option("--backend", default=None, hidden=True, metavar="SOCKET",
                  help="Internal (dllama-mpi serve): rank 0 takes requests from the supervisor listening on this "
                       "unix socket instead of serving HTTP.")
    @spmd
    def api(comm, model_path, tokenizer_path, nthreads, buffer_float_type, max_seq_len, sync_scheme, load, max_batch,
            temperature, topp, seed, parallel, max_n, host, port, api_key, max_body_bytes, cors_origin, chat_template,
            model_name, verbose, no_web_ui, backend):
        """OpenAI-compatible HTTP server on rank 0 (run under mpirun -np N)."""
        from .chat import template_for

        if not comm.is_root:
            # mpiexec forwards SIGINT/SIGTERM to every rank; the root stops the workers itself.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)
        elif backend is None:
            check_server_options(port, max_body_bytes, max_n)
        spec = spec_config() if comm.is_root else None
        engine, tokenizer = start(comm, model_path, tokenizer_path, nthreads, buffer_float_type, max_seq_len,
                                  sync_scheme, load, max_batch, n_slots=parallel)
        if not comm.is_root:
            engine.serve()
            return
        try:
            if backend is not None:
                from .backend import run_backend

                run_backend(engine, tokenizer, backend, spec)
                return
            template = template_for(tokenizer, chat_template)
            name = model_name or _model_id(model_path)
            server = Server(engine, tokenizer, name, template, {"temperature": temperature, "top_p": topp,
                                                               "seed": seed},
                            api_key, max_body_bytes, list(cors_origin), web_ui=not no_web_ui, max_n=max_n, spec=spec)
            serve_http(server, host, port, verbose)
        finally:
            engine.stop_workers()

    group.add_command(api)


def _model_id(model_path: str | None) -> str:
    if not model_path:
        return "smollm2-135m-instruct"
    from .gguf import SPLIT_SUFFIX

    base = SPLIT_SUFFIX.sub(".gguf", os.path.basename(model_path))   # a split GGUF's name without its part
    for ext in (".m", ".gguf"):
        if base.endswith(ext):
            return base[:-len(ext)]
    return base
