"""One tenant cannot hurt another (issue 13), on a real server over loopback.

Tenant "mallory" sends what breaks naive servers (lone surrogates, huge requests, slow or
conflicting framing); tenant "alice" must not notice.
"""

import contextlib
import http.client
import os
import socket
import subprocess
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.datasets import keyword_rows
from tests.integration.test_jobs_restart import wait_for
from tests.server import ServerProcess

pytestmark = pytest.mark.integration

FAST = {"learning_rate": 0.05, "init_head_l2": 0.001, "batch_size": 8, "epochs": 2}


def two_tenants(server):
    """Alice's and Mallory's keys, each tenant with a trained adapter `tickets`."""
    keys = {}
    with server.client() as admin:
        for name in ("alice", "mallory"):
            tenant = admin.post("/v1/tenants", json={"name": name}).json()
            key = admin.post(
                f"/v1/tenants/{tenant['id']}/keys", json={"scopes": ["train", "predict"]}
            )
            keys[name] = key.json()["key"]
    for key in keys.values():
        with server.client(key) as c:
            body = {"name": "tickets", "training_data": keyword_rows(20), "hyperparameters": FAST}
            resp = c.post("/v1/adapters", json=body)
            assert resp.status_code == 202, resp.text
            wait_for(c, resp.json()["job"]["id"], lambda j: j["status"] == "succeeded", 300)
    return keys


@pytest.fixture(scope="module")
def server(tmp_path_factory, tiny_bert_dir):
    with ServerProcess(tmp_path_factory.mktemp("hostile") / "data", base_model=tiny_bert_dir,
                       max_wait_ms=20, header_timeout_seconds=2, body_timeout_seconds=2,
                       max_body_bytes=1_000_000) as srv:  # fmt: skip
        srv.keys = two_tenants(srv)  # type: ignore[attr-defined]
        yield srv


def test_lone_surrogates_fail_only_their_own_requests(server):
    bad = b'{"inputs": ["refund \\ud800 please"]}'
    alice = server.client(server.keys["alice"])
    mallory = server.client(server.keys["mallory"])

    def send(i):
        if i % 4 == 1:  # 10 of mallory's among 30 of alice's, all at once
            return "mallory", mallory.post(
                "/v1/adapters/tickets/predict",
                content=bad,
                headers={"content-type": "application/json"},
            )
        return "alice", alice.post(
            "/v1/adapters/tickets/predict", json={"inputs": ["refund for my card", "login"]}
        )

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(send, range(40)))
    statuses = {"alice": [], "mallory": []}
    for who, resp in results:
        statuses[who].append(resp.status_code)
    assert statuses["alice"] == [200] * 30
    assert statuses["mallory"] == [422] * 10
    assert "lone surrogate" in results[1][1].json()["detail"]
    alice.close()
    mallory.close()


@pytest.mark.slow
@pytest.mark.exclusive  # compares latencies: nothing else may load the cores meanwhile
def test_a_huge_request_does_not_block_another_tenants_small_ones(tmp_path):
    """The real default model: 128 texts of 10,000 characters (32,768 tokens, ~25 s of work on 2
    CPU cores) from one tenant, 1-text predicts from another meanwhile. Before fair passes each of
    those waited for the whole big request."""
    with ServerProcess(tmp_path / "data") as server:
        keys = two_tenants(server)
        big_done = threading.Event()
        big = {}

        def send_big():
            with server.client(keys["mallory"], timeout=600) as c:
                texts = [("refund my card charge please " * 400)[:10_000]] * 128
                big["resp"] = c.post("/v1/adapters/tickets/predict", json={"inputs": texts})
                big["seconds"] = time.monotonic() - started
            big_done.set()

        started = time.monotonic()
        thread = threading.Thread(target=send_big)
        thread.start()
        time.sleep(1.0)  # the big request is tokenized and queued
        small = []
        with server.client(keys["alice"]) as c:
            while not big_done.is_set():
                t0 = time.monotonic()
                resp = c.post("/v1/adapters/tickets/predict", json={"inputs": ["login error"]})
                small.append((resp.status_code, time.monotonic() - t0, big_done.is_set()))
        thread.join()
    during = [s for s in small if not s[2]]
    print(f"\nbig request {big['seconds']:.1f} s; {len(during)} small predicts meanwhile, "
          f"slowest {max(s[1] for s in during):.3f} s")  # fmt: skip
    assert big["resp"].status_code == 200, big["resp"].text
    assert len(big["resp"].json()["predictions"]) == 128
    assert len(during) >= 3  # the big one really ran while they were served
    assert all(code == 200 for code, _, _ in small)
    # Without fair passes each small predict waited for the whole big request; with them it
    # waits for about one pass. Relative to the big request, so a busy machine does not fail it
    # (typical: big 16-25 s, slowest small 0.3-1.3 s on 2 cores).
    assert max(seconds for _, seconds, _ in during) < big["seconds"] / 5


# --- framing and slow clients: raw sockets, since real clients refuse to send these ---


def raw(server, data: bytes, *, pause: float = 0.0, chunks=()):
    """Send `data` (then each of `chunks`, `pause` s apart) on a fresh connection; return what
    the server answered until it closed the connection, and the seconds that took."""
    sock = socket.create_connection(("127.0.0.1", server.port), timeout=30)
    started = time.monotonic()
    try:
        sock.sendall(data)
        for chunk in chunks:
            time.sleep(pause)
            try:
                sock.sendall(chunk)
            except OSError:  # the server closed the connection: stop sending
                break
        answer = b""
        while True:
            try:
                part = sock.recv(65536)
            except ConnectionResetError:
                break
            if not part:
                break
            answer += part
        return answer, time.monotonic() - started
    finally:
        sock.close()


def head(server, path, *lines: str) -> bytes:
    auth = f"Authorization: Bearer {server.keys['alice']}"
    return "\r\n".join([f"POST {path} HTTP/1.1", "Host: x", auth, *lines, "", ""]).encode()


def test_content_length_with_transfer_encoding_is_refused_before_the_body(server):
    predict = "/v1/adapters/tickets/predict"
    request = head(server, predict, "Content-Length: 10", "Transfer-Encoding: chunked")
    pipelined = head(server, "/v1/adapters", "Content-Length: 0")
    # Only the head is sent (then a pipelined request): no body is needed for the answer.
    answer, _ = raw(server, request + pipelined)
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
    assert b"both Content-Length and Transfer-Encoding" in answer
    assert b"connection: close" in answer.lower()
    assert answer.count(b"HTTP/1.1 ") == 1  # the pipelined request was not answered


def test_obsolete_line_folding_is_refused(server):
    folded = head(server, "/v1/adapters/tickets/predict", "Transfer-Encoding:", " chunked")
    answer, _ = raw(server, folded + b"0\r\n\r\n")
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
    assert b"line folding" in answer


def test_a_chunked_body_is_counted_as_it_arrives(server):
    request = head(server, "/v1/adapters/tickets/predict", "Transfer-Encoding: chunked",
                   "Content-Type: application/json")  # fmt: skip
    chunk = b"%x\r\n%s\r\n" % (65536, b"x" * 65536)
    answer, _ = raw(server, request, chunks=[chunk] * 40)  # 2.6 MB against a 1 MB limit
    assert answer.startswith(b"HTTP/1.1 413 "), answer[:200]
    assert b"LORADOCK_MAX_BODY_BYTES" in answer


def test_slow_headers_are_cut_off(server):
    lines = [b"X-Slow-%d: 1\r\n" % i for i in range(20)]  # 10 s of headers at one per 0.5 s
    answer, seconds = raw(server, b"GET /healthz HTTP/1.1\r\nHost: x\r\n", pause=0.5,
                          chunks=lines)  # fmt: skip
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert b"LORADOCK_HEADER_TIMEOUT_SECONDS" in answer
    assert seconds < 5


def test_slow_bodies_are_cut_off(server):
    request = head(server, "/v1/adapters/tickets/predict", "Content-Length: 40",
                   "Content-Type: application/json")  # fmt: skip
    answer, seconds = raw(server, request, pause=0.5, chunks=[b"{"] * 40)
    assert answer.startswith(b"HTTP/1.1 408 "), answer[:200]
    assert b"LORADOCK_BODY_TIMEOUT_SECONDS" in answer
    assert seconds < 5
    with server.client(server.keys["alice"]) as c:  # and the server serves on
        assert c.post("/v1/adapters/tickets/predict", json={"inputs": ["x"]}).status_code == 200


def test_an_idle_connection_that_sent_nothing_is_closed(server):
    answer, seconds = raw(server, b"")
    assert answer == b""
    assert seconds < 5


# --- a full disk during training ---


@pytest.fixture
def small_disk(tmp_path):
    """A 48 MB tmpfs for the data directory (a real full disk: ENOSPC, SQLITE_FULL)."""
    mount_point = tmp_path / "disk"
    mount_point.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(mount_point)],
                          capture_output=True, text=True)  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", "-l", str(mount_point)], check=False)


def fill(path):
    """Write zeros to `path` until the file system is full (unbuffered: every byte lands)."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        for size in (1 << 20, 4096, 1):
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * size)
    finally:
        os.close(fd)


def test_a_full_disk_fails_the_job_clearly_and_training_resumes_when_space_returns(
    small_disk, tiny_bert_dir, tmp_path
):
    slow = {**FAST, "epochs": 40, "patience": 40, "batch_size": 4}
    server = ServerProcess(small_disk / "data", base_model=tiny_bert_dir)
    server.log_path = tmp_path / "server.log"  # not on the disk that fills up
    with server, server.client() as c:
        pid = server.proc.pid
        body = {"name": "tickets", "training_data": keyword_rows(40), "hyperparameters": slow}
        resp = c.post("/v1/adapters", json=body)
        assert resp.status_code == 202, resp.text
        job_id = resp.json()["job"]["id"]
        wait_for(c, job_id, lambda j: j["status"] == "running", 60)
        filler = small_disk / "filler"
        fill(filler)
        try:
            # New work is refused with the cause, not a generic 500.
            body2 = {"name": "more", "training_data": keyword_rows(20)}
            refused = c.post("/v1/adapters", json=body2)
            assert refused.status_code == 507, refused.text
            assert "disk is full" in refused.json()["detail"]
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:  # the job hits the full disk and fails
                jobs = c.get("/readyz").json()["jobs"]
                if jobs["last_error"]:
                    break
                time.sleep(0.5)
            assert "disk is full" in jobs["last_error"], jobs
            assert jobs["alive"] == jobs["workers"] == 1
        finally:
            filler.unlink()
        job = wait_for(c, job_id, lambda j: j["status"] not in ("queued", "running"), 60)
        assert job["status"] == "failed"
        assert "disk is full" in job["error"]
        assert "see the log" not in job["error"]
        # Space is back: the same process trains again, without a restart.
        again = c.post(
            "/v1/adapters/tickets/versions",
            json={"training_data": keyword_rows(20), "hyperparameters": FAST},
        )
        assert again.status_code == 202, again.text
        done = wait_for(c, again.json()["job"]["id"],
                        lambda j: j["status"] not in ("queued", "running"), 120)  # fmt: skip
        assert done["status"] == "succeeded", done
        assert server.proc.pid == pid
        assert c.get("/readyz").json()["jobs"]["restarts"] == 0


# --- SIGTERM with keep-alive clients ---


def test_draining_closes_keep_alive_connections_cleanly(tmp_path, tiny_bert_dir):
    """During the drain every answer says `Connection: close`, so a keep-alive client reconnects
    instead of sending its next request into a socket the server is about to close.

    Counted as a reset: a request on a connection that had already served an answer and that
    fails without an answer (what keep-alive clients met before). A fresh connection that races
    the listener's close is refused, not reset on a kept-alive connection; it is counted apart
    (a load balancer stops routing during LORADOCK_DRAIN_SECONDS, so it does not happen there).
    """
    server = ServerProcess(tmp_path / "data", base_model=tiny_bert_dir, drain_seconds=2)
    server.start()
    stop = threading.Event()
    results = {"keep_alive_resets": 0, "fresh_failures": 0, "ok": 0, "closing": 0}
    lock = threading.Lock()

    def count(key):
        with lock:
            results[key] += 1

    def client_loop():
        conn, served = None, 0
        while not stop.is_set():
            if conn is None:
                conn, served = http.client.HTTPConnection("127.0.0.1", server.port, timeout=10), 0
            try:
                conn.request("GET", "/healthz")
                resp = conn.getresponse()
                resp.read()
            except OSError as e:  # refused, reset, or closed without an answer
                count("keep_alive_resets" if served else "fresh_failures")
                conn.close()
                conn = None
                if isinstance(e, ConnectionRefusedError):
                    return  # the listener is closed: the server is gone
                continue
            except http.client.HTTPException:
                count("keep_alive_resets" if served else "fresh_failures")
                conn.close()
                conn = None
                continue
            served += 1
            count("ok")
            if resp.getheader("connection") == "close":
                count("closing")
                conn.close()
                conn = None
            time.sleep(0.05)

    threads = [threading.Thread(target=client_loop) for _ in range(8)]
    try:
        for t in threads:
            t.start()
        time.sleep(1.0)
        server.terminate()
        assert server.wait(60) == 0
        stop.set()
        for t in threads:
            t.join(30)
    finally:
        stop.set()
        server.stop()
    print(f"\ndrain with 8 keep-alive clients: {results}")
    assert results["keep_alive_resets"] == 0, results
    assert results["closing"] > 0, results  # answers during the drain asked to reconnect
    assert results["ok"] > 8, results


# --- event streams ---


def read_stream(server, key, job_id, timeout=30):
    """Lines of a job's event stream until the server ends it, and the seconds it lasted."""
    started = time.monotonic()
    lines = []
    with (
        httpx.Client(base_url=server.url, timeout=timeout) as c,
        c.stream(
            "GET", f"/v1/jobs/{job_id}/events", headers={"Authorization": f"Bearer {key}"}
        ) as resp,
    ):
        assert resp.status_code == 200
        for line in resp.iter_lines():
            lines.append(line)
    return lines, time.monotonic() - started


def test_event_streams_end_on_revocation_and_at_their_lifetime(tmp_path, tiny_bert_dir):
    server = ServerProcess(tmp_path / "data", base_model=tiny_bert_dir, job_workers=0,
                           events_max_seconds=4, events_keepalive_seconds=1)  # fmt: skip
    with server, server.client() as admin:
        tenant = admin.post("/v1/tenants", json={"name": "acme"}).json()["id"]
        key = admin.post(f"/v1/tenants/{tenant}/keys", json={"scopes": ["train"]}).json()
        with server.client(key["key"]) as c:  # a job that stays queued: no workers
            body = {"name": "t", "training_data": keyword_rows(20)}
            job_id = c.post("/v1/adapters", json=body).json()["job"]["id"]
        # lifetime: the stream ends by itself, with a comment saying how to go on
        lines, seconds = read_stream(server, key["key"], job_id)
        assert 3.5 < seconds < 15
        assert any("reconnect with Last-Event-ID" in line for line in lines)
        # revocation: the open stream ends at the next poll with an error event
        timer = threading.Timer(1.0, lambda: admin.delete(f"/v1/keys/{key['id']}"))
        timer.start()
        lines, seconds = read_stream(server, key["key"], job_id)
        timer.join()
        assert seconds < 3.5  # before its lifetime
        assert "event: error" in lines
        assert any("the API key was revoked" in line for line in lines)


def test_connections_beyond_the_concurrency_limit_get_503(tmp_path, tiny_bert_dir):
    with ServerProcess(tmp_path / "data", base_model=tiny_bert_dir, max_concurrency=4,
                       header_timeout_seconds=30) as server:  # fmt: skip
        idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(4)]
        try:
            time.sleep(0.3)
            resp = httpx.get(server.url + "/healthz", timeout=10)
            assert resp.status_code == 503
        finally:
            for sock in idle:
                sock.close()
        time.sleep(0.3)
        assert httpx.get(server.url + "/healthz", timeout=10).status_code == 200
