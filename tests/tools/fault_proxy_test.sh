#!/usr/bin/env bash
# Tests of the fault-injecting proxy ($FAULT_PROXY) against a tiny python3
# upstream on loopback: bytes pass unchanged with no fault; cut resets the
# connections open at that moment after exactly N bytes and later ones work;
# stall stops delivery and holds the connection open; corrupt flips exactly the
# byte at offset N (summed over connections); bad flags exit 2 with one line.
set -u
FAULT_PROXY=${FAULT_PROXY:-build/tests/fault_proxy}
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fails=0
pass() { echo "PASS: $*"; }
fail() { echo "FAIL: $*"; fails=$((fails + 1)); }

# Usage errors: exit 2, one line on stderr, nothing started.
for args in "" "--upstream 127.0.0.1:1" "--listen 127.0.0.1:0" \
            "--listen 0.0.0.0:0 --upstream 127.0.0.1:1" "--listen 10.1.2.3:0 --upstream 127.0.0.1:1" \
            "--listen 127.0.0.1:0 --upstream 192.0.2.1:80" "--listen 127.0.0.1:0 --upstream example.com:80" \
            "--listen 127.0.0.1:0 --upstream 127.0.0.1:0" "--listen 127.0.0.1:99999 --upstream 127.0.0.1:1" \
            "--listen 127.0.0.1 --upstream 127.0.0.1:1" \
            "--listen 127.0.0.1:0 --upstream 127.0.0.1:1 --fault explode" \
            "--listen 127.0.0.1:0 --upstream 127.0.0.1:1 --after 12Q" \
            "--listen 127.0.0.1:0 --upstream 127.0.0.1:1 --direction sideways" \
            "--listen 127.0.0.1:0 --upstream 127.0.0.1:1 --bogus 1" \
            "--listen 127.0.0.1:0 --upstream 127.0.0.1:1 --after"; do
  # shellcheck disable=SC2086
  timeout 5 "$FAULT_PROXY" $args >"$tmp/out" 2>"$tmp/err"
  rc=$?
  if [ $rc -eq 2 ] && [ "$(wc -l <"$tmp/err")" -eq 1 ] && grep -q "^fault_proxy: error: " "$tmp/err"; then
    pass "usage error: '$args'"
  else
    fail "usage error: '$args' (rc $rc): $(cat "$tmp/err")"
  fi
done
if "$FAULT_PROXY" --help | grep -q Usage; then pass "--help"; else fail "--help"; fi

if ! FAULT_PROXY=$FAULT_PROXY TMPDIR=$tmp python3 - <<'PY'
import os, signal, socket, subprocess, sys, threading, time

PROXY = os.environ["FAULT_PROXY"]
TMP = os.environ["TMPDIR"]
fails = 0

def check(name, ok, detail=""):
    global fails
    if ok:
        print("PASS: " + name)
    else:
        fails += 1
        print("FAIL: %s: %s" % (name, detail))
    sys.stdout.flush()

def wait_until(pred, timeout=5.0):
    end = time.time() + timeout
    while time.time() < end:
        if pred():
            return True
        time.sleep(0.02)
    return pred()

class Upstream:
    """Loopback server: 'sink' records what each connection sends; 'echo' also sends it back."""
    def __init__(self, mode):
        self.mode = mode
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(64)
        self.port = self.sock.getsockname()[1]
        self.conns = []
        self.lock = threading.Lock()
        threading.Thread(target=self.accept, daemon=True).start()

    def accept(self):
        while True:
            try:
                c, _ = self.sock.accept()
            except OSError:
                return
            rec = {"data": bytearray(), "closed": False, "error": None}
            with self.lock:
                self.conns.append(rec)
            threading.Thread(target=self.serve, args=(c, rec), daemon=True).start()

    def serve(self, c, rec):
        try:
            while True:
                b = c.recv(65536)
                if not b:
                    break
                rec["data"] += b
                if self.mode == "echo":
                    c.sendall(b)
        except OSError as e:
            rec["error"] = e.__class__.__name__
        rec["closed"] = True
        c.close()

    def conn(self, i):
        with self.lock:
            return self.conns[i] if i < len(self.conns) else None

    def close(self):
        self.sock.close()

class Proxy:
    n = 0
    def __init__(self, upstream_port, *args):
        Proxy.n += 1
        self.port_file = os.path.join(TMP, "port%d" % Proxy.n)
        self.log = os.path.join(TMP, "log%d" % Proxy.n)
        self.p = subprocess.Popen([PROXY, "--listen", "127.0.0.1:0", "--upstream", "127.0.0.1:%d" % upstream_port,
                                   "--port-file", self.port_file, "--log", self.log] + list(args))
        if not wait_until(lambda: os.path.exists(self.port_file)):
            raise RuntimeError("proxy did not write its port file")
        self.port = int(open(self.port_file).read())

    def log_text(self):
        return open(self.log).read() if os.path.exists(self.log) else ""

    def stop(self, sig=signal.SIGTERM):
        self.p.send_signal(sig)
        try:
            return self.p.wait(5)
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()
            return "hung"

def connect(port):
    return socket.create_connection(("127.0.0.1", port), timeout=10)

def send_all(s, data, shut=True):
    """Sends data; returns the exception name on failure, else None."""
    try:
        s.sendall(data)
        if shut:
            s.shutdown(socket.SHUT_WR)
    except OSError as e:
        return e.__class__.__name__
    return None

def recv_all(s, limit, timeout=10):
    """Reads until EOF, an error, `limit` bytes or timeout; returns (data, how it ended)."""
    s.settimeout(timeout)
    out = bytearray()
    while len(out) < limit:
        try:
            b = s.recv(65536)
        except socket.timeout:
            return bytes(out), "timeout"
        except OSError as e:
            return bytes(out), e.__class__.__name__
        if not b:
            return bytes(out), "eof"
        out += b
    return bytes(out), "limit"

def echo_exchange(port, data):
    """Sends data to an echo upstream through the proxy while reading the answer."""
    s = connect(port)
    result = {}
    t = threading.Thread(target=lambda: result.update(err=send_all(s, data)))
    t.start()
    got, how = recv_all(s, len(data) + 1)
    t.join(10)
    s.close()
    return got, how, result.get("err")

# --- none: several concurrent connections, large transfers, unchanged both ways.
up = Upstream("echo")
px = Proxy(up.port)
payloads = [os.urandom(1 << 20) for _ in range(4)]
results = [None] * 4
def worker(i):
    results[i] = echo_exchange(px.port, payloads[i])
threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
for t in threads: t.start()
for t in threads: t.join(30)
check("none: 4 concurrent connections x 1 MiB echoed unchanged",
      all(r is not None and r[0] == payloads[i] and r[1] == "eof" for i, r in enumerate(results)),
      [(len(r[0]), r[1]) if r else None for r in results])
check("none: upstream saw every byte unchanged",
      sorted(bytes(up.conn(i)["data"]) for i in range(4)) == sorted(payloads))
check("none: no fault line", px.log_text() == "", px.log_text())
rc = px.stop(signal.SIGINT)
check("SIGINT exits 0", rc == 0, rc)
up.close()

# --- cut up after N: the open connection is reset after exactly N bytes; a new one works.
N = 100000
up = Upstream("sink")
px = Proxy(up.port, "--fault", "cut", "--after", str(N))
idle = connect(px.port)  # open but silent: cut too, as it is open when the fault fires
wait_until(lambda: up.conn(0) is not None)
s = connect(px.port)
data = os.urandom(300000)
err = send_all(s, data)
got, how = recv_all(s, 1)
s.close()
wait_until(lambda: up.conn(1) is not None and up.conn(1)["closed"])
r = up.conn(1)
check("cut up: upstream got exactly the first N bytes", r is not None and bytes(r["data"]) == data[:N],
      r and len(r["data"]))
check("cut up: upstream side reset", r is not None and r["error"] == "ConnectionResetError", r and r["error"])
check("cut up: client side reset", how == "ConnectionResetError" or err == "ConnectionResetError", (how, err))
got_idle, how_idle = recv_all(idle, 1, timeout=3)
wait_until(lambda: up.conn(0)["closed"])  # the upstream thread may see the reset a moment after the client
check("cut up: the idle connection open at that moment is reset too",
      how_idle == "ConnectionResetError" and up.conn(0)["closed"], (how_idle, up.conn(0)))
idle.close()
check("cut up: one fault line", px.log_text() == "fault_proxy: cut after %d bytes up (2 connections)\n" % N,
      px.log_text())
s = connect(px.port)
err = send_all(s, data)
got, how = recv_all(s, 1)
s.close()
wait_until(lambda: up.conn(2) is not None and up.conn(2)["closed"])
r = up.conn(2)
check("cut up: a later connection is forwarded whole", err is None and how == "eof" and r is not None and
      bytes(r["data"]) == data and r["error"] is None, (err, how, r and len(r["data"]), r and r["error"]))
check("cut fires once", px.log_text().count("\n") == 1, px.log_text())
rc = px.stop()
check("SIGTERM exits 0", rc == 0, rc)
up.close()

# --- cut down after N, counted over two connections.
up = Upstream("echo")
px = Proxy(up.port, "--fault", "cut", "--after", "150000", "--direction", "down")
d1 = os.urandom(100000)
got1, how1, _ = echo_exchange(px.port, d1)
d2 = os.urandom(200000)
got2, how2, err2 = echo_exchange(px.port, d2)
check("cut down: first connection whole", got1 == d1 and how1 == "eof", (len(got1), how1))
check("cut down: second connection reset after 50000 bytes down", got2 == d2[:50000] and
      how2 == "ConnectionResetError", (len(got2), how2, err2))
check("cut down: fault line", "cut after 150000 bytes down (1 connection)" in px.log_text(), px.log_text())
check("cut down: SIGTERM exits 0", px.stop() == 0)
up.close()

# --- stall up after N: delivery stops at N, the connection is held open; later ones work.
up = Upstream("sink")
px = Proxy(up.port, "--fault", "stall", "--after", str(N))
s = connect(px.port)
data = os.urandom(300000)
threading.Thread(target=lambda: send_all(s, data, shut=False), daemon=True).start()
wait_until(lambda: up.conn(0) is not None and len(up.conn(0)["data"]) >= N)
time.sleep(1.5)
r = up.conn(0)
check("stall up: upstream got exactly N bytes and nothing more", r is not None and bytes(r["data"]) == data[:N],
      r and len(r["data"]))
check("stall up: connection held open", r is not None and not r["closed"], r and r["error"])
s.settimeout(0.5)
try:
    s.recv(1)
    held = False
except socket.timeout:
    held = True
except OSError:
    held = False
check("stall up: client side held open (no EOF, no reset)", held)
s2 = connect(px.port)
err = send_all(s2, data)
wait_until(lambda: up.conn(1) is not None and up.conn(1)["closed"])
r2 = up.conn(1)
check("stall up: a later connection is forwarded whole", err is None and r2 is not None and bytes(r2["data"]) == data,
      (err, r2 and len(r2["data"])))
check("stall up: fault line", px.log_text() == "fault_proxy: stall after %d bytes up (1 connection)\n" % N,
      px.log_text())
t0 = time.time()
rc = px.stop()
check("stall: SIGTERM exits 0 promptly with a stalled connection", rc == 0 and time.time() - t0 < 2, rc)
check("stall: the stalled connection closes when the proxy exits", wait_until(lambda: up.conn(0)["closed"]))
s.close(); s2.close()
up.close()

# --- stall with --after 0: nothing is delivered at all.
up = Upstream("sink")
px = Proxy(up.port, "--fault", "stall", "--after", "0")
s = connect(px.port)
send_all(s, b"x" * 1000, shut=False)
time.sleep(0.5)
r = up.conn(0)
check("stall after 0: nothing delivered", r is not None and len(r["data"]) == 0 and not r["closed"], r)
check("stall after 0: fault line", "stall after 0 bytes up" in px.log_text(), px.log_text())
px.stop(); s.close(); up.close()

# --- corrupt up at offset N, counted over connections: exactly one byte flipped.
up = Upstream("echo")
px = Proxy(up.port, "--fault", "corrupt", "--after", "70000")
d1 = os.urandom(50000)
got1, how1, _ = echo_exchange(px.port, d1)
d2 = os.urandom(300000)
got2, how2, _ = echo_exchange(px.port, d2)
want2 = bytearray(d2); want2[20000] ^= 0xff
check("corrupt up: first connection unchanged", got1 == d1 and bytes(up.conn(0)["data"]) == d1)
diff = [i for i in range(len(d2)) if i < len(up.conn(1)["data"]) and up.conn(1)["data"][i] != d2[i]]
check("corrupt up: exactly byte 70000 (byte 20000 of the second connection) flipped",
      bytes(up.conn(1)["data"]) == bytes(want2), (len(up.conn(1)["data"]), diff[:5]))
check("corrupt up: the echo of the corrupted byte comes back as sent (down untouched)",
      got2 == bytes(want2) and how2 == "eof", (len(got2), how2))
check("corrupt up: fault line", "corrupt after 70000 bytes up" in px.log_text(), px.log_text())
d3 = os.urandom(100000)
got3, _, _ = echo_exchange(px.port, d3)
check("corrupt fires once", got3 == d3 and px.log_text().count("\n") == 1, px.log_text())
px.stop()
up.close()

# --- corrupt down at offset 0.
up = Upstream("echo")
px = Proxy(up.port, "--fault", "corrupt", "--after", "0", "--direction", "down")
d = os.urandom(10000)
got, how, _ = echo_exchange(px.port, d)
want = bytearray(d); want[0] ^= 0xff
check("corrupt down at 0: first byte flipped on the way back only",
      got == bytes(want) and bytes(up.conn(0)["data"]) == d, len(got))
px.stop()
up.close()

# --- upstream refusing: the client is dropped, the proxy carries on.
dead = socket.socket(); dead.bind(("127.0.0.1", 0)); dead_port = dead.getsockname()[1]; dead.close()
px = Proxy(dead_port)
try:
    s = connect(px.port)
    got, how = recv_all(s, 1, timeout=5)
except ConnectionResetError:  # the proxy's reset can beat the end of connect() on a loaded machine
    got, how = b"", "ConnectionResetError"
check("upstream refused: client closed", how in ("eof", "ConnectionResetError"), how)
check("upstream refused: logged", "connect (upstream)" in px.log_text(), px.log_text())
check("upstream refused: proxy still running", px.p.poll() is None)
px.stop()

sys.exit(1 if fails else 0)
PY
then
  fails=$((fails + 1))
fi
echo "fault_proxy_test: $fails failure(s)"
exit $((fails > 0))
