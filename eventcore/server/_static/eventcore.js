// eventcore.js: the browser client of the eventcore HTTP API. One dependency-free ES module,
// served by the service at /ui/eventcore.js.
//
//   import { EventcoreClient } from "https://api.example.com/ui/eventcore.js";
//   const ec = new EventcoreClient({ baseUrl: "https://api.example.com", token });
//   for await (const item of ec.events(sessionId)) { ... }   // every envelope type, in seq order
//
// The stream is read with fetch (not EventSource): every named SSE event is delivered (an
// EventSource hands a named event only to a listener of that name, so unknown types would be
// lost), the credential goes in the Authorization header (never in a URL), and the stream
// resumes with Last-Event-ID after a dropped connection or a restarting server (honouring its
// retry hint), with exponential backoff and jitter. On 401, and when a stream's token expires
// (token.expired), refreshToken() is asked for a new credential. Nothing is skipped or shown
// twice: an envelope at or below the cursor is dropped.
//
// The cursor is the full SSE id: the seq, and the stream epoch once the session's history has
// diverged (a failover lost acknowledged appends): "<seq>.<epoch>". Every reconnect sends it
// back as Last-Event-ID; a resume from an older epoch gets one StreamReset with reason
// "diverged": drop what you hold after its resumeAfter, the new history follows.

export const CONTROL_EVENTS = Object.freeze(["server.shutdown", "token.expired",
  "session.deleted", "stream.reset"]);

/** An error answer of the service (status, problem slug, detail) or a lost connection. */
export class EventcoreError extends Error {
  constructor(message, { status = 0, problem = "", detail = "", body = null, cause } = {}) {
    super(message, cause === undefined ? undefined : { cause });
    this.name = "EventcoreError";
    this.status = status;
    this.problem = problem;
    this.detail = detail;
    this.body = body;
  }
}

/** Yielded at a stream.reset; the stream goes on after resumeAfter. reason "gone": history
 * after the cursor was trimmed everywhere (nothing to drop). reason "diverged": the history
 * after resumeAfter may have been rewritten (a failover lost acknowledged appends) or the cursor
 * was beyond the tail: drop what you hold after resumeAfter; what follows is the history of
 * `epoch` (seenEpoch: the epoch the cursor was in). */
export class StreamReset {
  constructor(after, firstAvailable, { reason = "gone", epoch = null, seenEpoch = null } = {}) {
    this.type = "stream.reset";
    this.reason = reason;
    this.after = after;
    this.firstAvailable = firstAvailable;
    this.resumeAfter = firstAvailable - 1;
    this.epoch = epoch;
    this.seenEpoch = seenEpoch;
  }
}

/** The SSE id of a cursor: "<seq>" in epoch 0, else "<seq>.<epoch>". */
export function eventId(after, epoch = "0") {
  return epoch && epoch !== "0" ? after + "." + epoch : String(after);
}

/** The last item of a stream whose session was deleted before its session.ended. */
export class SessionDeleted {
  constructor(sessionId, lastSeq, incarnation) {
    this.type = "session.deleted";
    this.sessionId = sessionId;
    this.lastSeq = lastSeq;
    this.incarnation = incarnation;
  }
}

const RETRY_STATUS = new Set([429, 502, 503, 504]);

function newKey() {
  if (globalThis.crypto && crypto.randomUUID) return crypto.randomUUID();
  return Date.now().toString(36) + Math.random().toString(36).slice(2);
}

function sleep(ms, signal) {
  return new Promise((resolve) => {
    if (signal && signal.aborted) return resolve();
    const t = setTimeout(resolve, ms);
    if (signal) signal.addEventListener("abort", () => { clearTimeout(t); resolve(); }, { once: true });
  });
}

async function errorOf(resp) {
  let body = null;
  try { body = await resp.json(); } catch (_) { /* not JSON */ }
  const type = String((body && (body.type || body.title)) || resp.statusText || "error");
  const problem = type.split("/").pop().split(":").pop();
  const detail = String((body && (body.detail || body.title)) || resp.statusText || "HTTP " + resp.status);
  return new EventcoreError(resp.status + " " + problem + ": " + detail,
                            { status: resp.status, problem, detail, body });
}

/** Parses text/event-stream lines; returns the event a blank line ends, or null. */
class SseParser {
  constructor() { this.reset(); }
  reset() { this.event = ""; this.data = []; this.id = null; this.retry = null; }
  feed(line) {
    if (line === "") {
      if (!this.data.length && this.id === null) { this.reset(); return null; }
      const ev = { event: this.event || "message", data: this.data.join("\n"), id: this.id, retry: this.retry };
      this.reset();
      return ev;
    }
    if (line[0] === ":") return null;
    const i = line.indexOf(":");
    const name = i < 0 ? line : line.slice(0, i);
    let value = i < 0 ? "" : line.slice(i + 1);
    if (value[0] === " ") value = value.slice(1);
    if (name === "event") this.event = value;
    else if (name === "data") this.data.push(value);
    else if (name === "id" && !value.includes("\0")) this.id = value;
    else if (name === "retry" && /^\d+$/.test(value)) this.retry = Number(value);
    return null;
  }
}

export class EventcoreClient {
  /**
   * @param {object} o
   * @param {string} [o.baseUrl] the service, e.g. "https://api.example.com" ("" = this origin)
   * @param {string} [o.token] the API key or a session token
   * @param {() => (string|Promise<string>)} [o.refreshToken] a new credential, on 401 and at
   *   a stream token's expiry
   */
  constructor({ baseUrl = "", token = null, refreshToken = null, fetch: fetchFn = null,
                backoffInitialMs = 200, backoffMaxMs = 10000, reconnectTimeoutMs = 120000,
                stallTimeoutMs = 60000 } = {}) {
    this.baseUrl = baseUrl.replace(/\/+$/, "");
    this.token = token;
    this.refreshToken = refreshToken;
    this.fetch = fetchFn || ((...a) => globalThis.fetch(...a));
    this.backoffInitialMs = backoffInitialMs;
    this.backoffMaxMs = backoffMaxMs;
    this.reconnectTimeoutMs = reconnectTimeoutMs;
    this.stallTimeoutMs = stallTimeoutMs;
  }

  _headers(extra) {
    const h = Object.assign({}, extra || {});
    if (this.token) h.Authorization = "Bearer " + this.token;
    return h;
  }

  async _refresh() {
    if (!this.refreshToken) return false;
    this.token = await this.refreshToken();
    return true;
  }

  _backoff(attempt) {
    const ceiling = Math.min(this.backoffMaxMs, this.backoffInitialMs * 2 ** Math.min(attempt, 16));
    return ceiling * (0.5 + Math.random() / 2);
  }

  _url(path, params) {
    const q = new URLSearchParams();
    for (const [k, v] of Object.entries(params || {})) {
      if (v === undefined || v === null) continue;
      for (const item of Array.isArray(v) ? v : [v]) q.append(k, String(item));
    }
    const qs = q.toString();
    return this.baseUrl + path + (qs ? "?" + qs : "");
  }

  static path(sessionId, tail = "") { return "/v1/sessions/" + encodeURIComponent(sessionId) + tail; }

  /** One API call: the JSON answer (null for 204). Unreachable service and 429/5xx answers
   * are retried with backoff (requests that may have been sent only when idempotent). */
  async request(method, path, { body, params, idempotent = true } = {}) {
    const deadline = Date.now() + this.reconnectTimeoutMs;
    let attempt = 0, refreshed = false;
    for (;;) {
      let resp;
      try {
        resp = await this.fetch(this._url(path, params), {
          method, cache: "no-store", credentials: "omit",
          headers: this._headers(body === undefined ? {} : { "Content-Type": "application/json" }),
          body: body === undefined ? undefined : JSON.stringify(body),
        });
      } catch (e) {
        // fetch cannot tell "never sent" from "sent, answer lost": retry only the idempotent
        if (!idempotent || Date.now() >= deadline) {
          throw new EventcoreError(method + " " + path + ": " + e, { cause: e });
        }
        await sleep(this._backoff(attempt++));
        continue;
      }
      if (resp.status === 401 && !refreshed && await this._refresh()) { refreshed = true; continue; }
      if (RETRY_STATUS.has(resp.status) && Date.now() < deadline) {
        const ra = Number(resp.headers.get("Retry-After"));
        await sleep(ra > 0 ? ra * 1000 : this._backoff(attempt++));
        continue;
      }
      if (!resp.ok) throw await errorOf(resp);
      if (resp.status === 204) return null;
      const text = await resp.text();
      return text ? JSON.parse(text) : null;
    }
  }

  /** Create a session (API key). An idempotency key is made up when none is given. */
  createSession(agent, { input, metadata, ttlS, idempotencyKey } = {}) {
    const body = { agent, idempotency_key: idempotencyKey || newKey() };
    if (input !== undefined) body.input = input;
    if (metadata !== undefined) body.metadata = metadata;
    if (ttlS !== undefined) body.ttl_s = ttlS;
    return this.request("POST", "/v1/sessions", { body });
  }
  getSession(id) { return this.request("GET", EventcoreClient.path(id)); }
  /** GET /v1/sessions (admin): {sessions: [...], next_cursor}. */
  listSessions(filters = {}) { return this.request("GET", "/v1/sessions", { params: filters }); }
  deleteSession(id) { return this.request("DELETE", EventcoreClient.path(id)); }
  /** Append an input; a repeated idempotencyKey appends nothing ({seq, duplicate: true}). */
  sendInput(id, payload, { idempotencyKey } = {}) {
    return this.request("POST", EventcoreClient.path(id, "/inputs"),
                        { body: { payload, idempotency_key: idempotencyKey || newKey() } });
  }
  sendSignal(id, key, value = null) {
    return this.request("POST", EventcoreClient.path(id, "/signals"), { body: { key, value } });
  }
  async signals(id, { sinceSeq = 0, keys } = {}) {
    const page = await this.request("GET", EventcoreClient.path(id, "/signals"),
                                    { params: { since_seq: sinceSeq, keys: keys ? keys.join(",") : undefined } });
    return page.signals;
  }
  cancel(id, { runId, reason } = {}) {
    const body = {};
    if (runId) body.run_id = runId;
    if (reason) body.reason = reason;
    return this.request("POST", EventcoreClient.path(id, "/cancel"), { body, idempotent: false });
  }
  getToken(id, { scope = "read", ttlS = 300 } = {}) {
    return this.request("POST", EventcoreClient.path(id, "/tokens"), { body: { scope, ttl_s: ttlS } });
  }
  /** One JSON page: {events, next_after, epoch} (and `reset`, the StreamReset fields, where
   * the history after `after` in `epoch` diverged: events is [] and next_after its
   * resume_after). Page on with { after: page.next_after, epoch: page.epoch }. */
  history(id, { after = 0, epoch = "0", limit = 100, types } = {}) {
    return this.request("GET", EventcoreClient.path(id, "/events"),
                        { params: { format: "json", after, limit, types: types ? types.join(",") : undefined,
                                    epoch: epoch && epoch !== "0" ? epoch : undefined } });
  }

  /**
   * Follow a session from seq after + 1 (of stream epoch `epoch`, as a saved cursor said):
   * every envelope once, in seq order, of every type (or only `types`), until session.ended
   * (yielded, then done) or its deletion (a SessionDeleted item, then done). StreamReset items
   * where history is gone or diverged. Resumes by Last-Event-ID, the full id.
   * Options: signal (an AbortSignal: stop), onStatus(status, detail) with status one of
   * "connecting", "live", "reconnecting", "ended", "deleted".
   * The returned iterator's `after`, `epoch` and `lastEventId` are its cursor (the last item
   * handed out): save { after, epoch } to resume later with events(id, { after, epoch }).
   */
  events(id, { after = 0, epoch = "0", ...options } = {}) {
    const cursor = { after, epoch: epoch || "0" };
    const items = this._follow(id, cursor, options);
    return Object.defineProperties(items, {
      after: { get: () => cursor.after },
      epoch: { get: () => cursor.epoch },
      lastEventId: { get: () => eventId(cursor.after, cursor.epoch) },
    });
  }

  async *_follow(id, at, { types, signal, onStatus } = {}) {
    const status = (s, d) => { if (onStatus) { try { onStatus(s, Object.assign({ epoch: at.epoch }, d)); } catch (_) { /* the caller's */ } } };
    let attempt = 0, refreshed = false, downSince = null, first = true;
    const path = EventcoreClient.path(id, "/events");
    while (!(signal && signal.aborted)) {
      status(first ? "connecting" : "reconnecting", { after: at.after });
      first = false;
      let delay = null, failure = null, resp = null;
      const abort = new AbortController();
      const stop = () => abort.abort();
      if (signal) signal.addEventListener("abort", stop, { once: true });
      let stall = null;
      const arm = () => { clearTimeout(stall); stall = setTimeout(stop, this.stallTimeoutMs); };
      try {
        const headers = this._headers({ Accept: "text/event-stream" });
        if (at.after || at.epoch !== "0") headers["Last-Event-ID"] = eventId(at.after, at.epoch);
        arm();
        resp = await this.fetch(this._url(path, { after: at.after, types: types ? types.join(",") : undefined,
                                                  epoch: at.epoch !== "0" ? at.epoch : undefined }),
                                { headers, cache: "no-store", credentials: "omit", signal: abort.signal });
        if (resp.status === 204) { status("ended", { after: at.after }); return; }
        if (resp.status === 401 && !refreshed && await this._refresh()) { refreshed = true; first = true; continue; }
        if (RETRY_STATUS.has(resp.status)) {
          failure = await errorOf(resp);
          const ra = Number(resp.headers.get("Retry-After"));
          if (ra > 0) delay = ra * 1000;
        } else if (!resp.ok) {
          throw await errorOf(resp);
        } else {
          attempt = 0; refreshed = false; downSince = null;
          status("live", { after: at.after });
          const reader = resp.body.pipeThrough(new TextDecoderStream()).getReader();
          const parser = new SseParser();
          let buf = "", done = false;
          try {
            while (!done) {
              const chunk = await reader.read();
              if (chunk.done) break;
              arm();
              buf += chunk.value;
              const lines = buf.split("\n");
              buf = lines.pop();
              for (const raw of lines) {
                const ev = parser.feed(raw.endsWith("\r") ? raw.slice(0, -1) : raw);
                if (!ev) continue;
                if (!CONTROL_EVENTS.includes(ev.event)) {
                  const env = JSON.parse(ev.data);
                  if (env.seq <= at.after) continue;        // never twice
                  // the id is "<seq>" (epoch 0) or "<seq>.<epoch>"; an epoch may also change
                  // with no reset (the cursor was in the history both epochs share)
                  at.after = env.seq;
                  at.epoch = String(ev.id || "").split(".")[1] || "0";
                  yield env;
                  if (env.type === "session.ended") { status("ended", { after: at.after }); return; }
                  continue;
                }
                const data = ev.data ? JSON.parse(ev.data) : {};
                if (ev.event === "stream.reset" && data.reason === "diverged") {
                  // back to where both histories agree, in the new epoch
                  const reset = new StreamReset(data.after, data.resume_after + 1,
                                                { reason: "diverged", epoch: String(data.epoch || "0"),
                                                  seenEpoch: String(data.seen_epoch || "0") });
                  at.after = reset.resumeAfter; at.epoch = reset.epoch;
                  yield reset;
                } else if (ev.event === "stream.reset") {
                  const reset = new StreamReset(data.after, data.first_available);
                  at.after = Math.max(at.after, reset.resumeAfter);
                  yield reset;
                } else if (ev.event === "session.deleted") {
                  status("deleted", data);
                  yield new SessionDeleted(id, data.last_seq, data.incarnation);
                  return;
                } else if (ev.event === "server.shutdown") {
                  delay = Number(data.retry_ms || ev.retry || 1000);
                  done = true; break;
                } else if (ev.event === "token.expired") {
                  await this._refresh();
                  refreshed = true; delay = 0;
                  done = true; break;
                }
              }
            }
          } finally {
            reader.cancel().catch(() => {});
          }
          if (delay === null) {
            // ended without saying why: done if the session has ended and we saw its end
            const s = await this.getSession(id);
            if (s.state === "ended" && s.last_seq <= at.after) { status("ended", { after: at.after }); return; }
            // else: backoff below, so a server that keeps closing is no hot loop
          }
        }
      } catch (e) {
        if (e instanceof EventcoreError && !RETRY_STATUS.has(e.status)) throw e;
        if (signal && signal.aborted) return;
        failure = e;
      } finally {
        clearTimeout(stall);
        if (signal) signal.removeEventListener("abort", stop);
        abort.abort();
      }
      if (failure) {
        const now = Date.now();
        downSince = downSince === null ? now : downSince;
        if (now - downSince >= this.reconnectTimeoutMs) {
          if (failure instanceof EventcoreError) throw failure;
          throw new EventcoreError("stream of " + id + " after " + eventId(at.after, at.epoch) + ": " + failure, { cause: failure });
        }
      }
      if (delay === null) delay = this._backoff(attempt++);
      status("reconnecting", { after: at.after, delayMs: delay, error: failure ? String(failure) : null });
      await sleep(delay, signal);
    }
  }

  /**
   * The callback form of events(): calls onEvent(envelope), onReset(StreamReset: on reason
   * "diverged", drop what you show after its resumeAfter), onDeleted(SessionDeleted),
   * onStatus(status, detail), onError(error) (terminal), and onEnd() once the stream is over.
   * Returns { close(), after, epoch, lastEventId } (the cursor, as events() keeps it).
   */
  subscribe(id, { after = 0, epoch = "0", types, onEvent, onReset, onDeleted, onStatus, onError, onEnd } = {}) {
    const ctl = new AbortController();
    const items = this.events(id, { after, epoch, types, signal: ctl.signal, onStatus });
    (async () => {
      try {
        for await (const item of items) {
          if (item instanceof StreamReset) { if (onReset) onReset(item); }
          else if (item instanceof SessionDeleted) { if (onDeleted) onDeleted(item); }
          else if (onEvent) onEvent(item);
        }
      } catch (e) {
        if (onError) onError(e); else console.error(e);
      } finally {
        if (onEnd) onEnd();
      }
    })();
    return {
      close: () => ctl.abort(),
      get after() { return items.after; },
      get epoch() { return items.epoch; },
      get lastEventId() { return items.lastEventId; },
    };
  }
}
