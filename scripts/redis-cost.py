#!/usr/bin/env python3
"""Redis CPU per uncontended lock cycle, split by what the cycle guarantees.

Starts a private redis-server on a free loopback port and runs lock
cycles on it: 4 connections, each on its own names (nothing contends), 8
cycles pipelined per round trip, each cycle's commands in order. The
server's `used_cpu_user` + `used_cpu_sys` before and after give its CPU
per cycle. Three interleaved rounds; the median is printed.

The rows are the floor (`SET NX PX`, then a compare-and-delete script),
the crate's own acquire and release scripts (src/redis/lua, with the
arguments the one-node backend sends on its uncontended path), and
cycles that do part of the acquire's work, to show what each guarantee
costs: the wait-queue check (`EXISTS`), the fencing counter (`HINCRBY`),
and Lua itself. The client is plain Python; only the server is measured.

    python3 scripts/redis-cost.py
    DSYNC_COST_CYCLES=50000 python3 scripts/redis-cost.py   # quicker
"""
import os
import socket
import statistics
import subprocess
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
LUA = os.path.join(ROOT, "src", "redis", "lua")
CYCLES = int(os.environ.get("DSYNC_COST_CYCLES", "200000"))
DEPTH = 8  # cycles in flight per connection
CONNECTIONS = 4
ROUNDS = 3


def lua(name):
    with open(os.path.join(LUA, name)) as f:
        text = f.read()
    with open(os.path.join(LUA, "wait_queue.lua")) as f:
        return text.replace("-- include: wait_queue.lua", f.read())


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(port, *args):
    return subprocess.run(
        ["redis-cli", "-p", str(port), *args], check=True, capture_output=True, text=True
    ).stdout.strip()


def cpu(port):
    fields = dict(
        line.split(":", 1) for line in cli(port, "info", "cpu").splitlines() if ":" in line
    )
    return float(fields["used_cpu_user"]) + float(fields["used_cpu_sys"])


def encode(command):
    out = [b"*%d\r\n" % len(command)]
    for word in command:
        word = word.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(word), word))
    return b"".join(out)


def skip_reply(buf, at):
    """The offset just past the reply that starts at `at`, or None."""
    end = buf.find(b"\r\n", at)
    if end < 0:
        return None
    kind, rest = buf[at:at + 1], buf[at + 1:end]
    at = end + 2
    if kind == b"*":
        for _ in range(max(int(rest), 0)):
            at = skip_reply(buf, at)
            if at is None:
                return None
        return at
    if kind == b"$":
        size = int(rest)
        if size < 0:
            return at
        return at + size + 2 if len(buf) >= at + size + 2 else None
    if kind == b"-":
        raise RuntimeError(rest.decode())
    return at


def cycle_cost(port, commands):
    """Server CPU µs per cycle: CYCLES cycles over 64 names, each cycle's
    commands in order on one connection, DEPTH cycles per batch."""
    names = ["k:%d" % i for i in range(64)]
    batches = []
    for start in range(0, 64, DEPTH):
        batches.append(b"".join(
            encode(command(name)) for name in names[start:start + DEPTH] for command in commands
        ))
    per_batch = DEPTH * len(commands)
    conns = [socket.create_connection(("127.0.0.1", port)) for _ in range(CONNECTIONS)]
    before = cpu(port)
    sent = 0
    turn = 0
    while sent < CYCLES:
        # Each connection works on its own names, so cycles never contend.
        for i, conn in enumerate(conns):
            conn.sendall(batches[(turn * CONNECTIONS + i) % len(batches)])
        for conn in conns:
            buf, at, got = b"", 0, 0
            while got < per_batch:
                nxt = skip_reply(buf, at)
                if nxt is None:
                    buf += conn.recv(65536)
                    continue
                at, got = nxt, got + 1
        sent += DEPTH * CONNECTIONS
        turn += 1
    cost = (cpu(port) - before) / sent * 1e6
    for conn in conns:
        conn.close()
    return cost


def main():
    port = free_port()
    server = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "",
         "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            try:
                cli(port, "ping")
                break
            except subprocess.CalledProcessError:
                time.sleep(0.05)
        load = lambda text: cli(port, "script", "load", text)
        acquire = load(lua("acquire.lua"))
        release = load(lua("release.lua"))
        only_set = load("return redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2])")
        exists_set = load(
            "return redis.call('EXISTS', KEYS[2]) == 0 and "
            "redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2])"
        )
        set_fence = load(
            "if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then "
            "return redis.call('HINCRBY', KEYS[2], 'fence', 1) end return 0"
        )
        compare_delete = load(
            "if redis.call('GET', KEYS[1]) == ARGV[1] then "
            "return redis.call('DEL', KEYS[1]) end return 0"
        )
        rows = [
            ("floor: SET NX PX + compare-and-delete",
             lambda k: ["SET", k, "v", "NX", "PX", "10000"],
             lambda k: ["EVALSHA", compare_delete, "1", k, "v"]),
            ("crate: acquire.lua + release.lua, one node, nobody waits",
             lambda k: ["EVALSHA", acquire, "4", k, "node", "queue", "deadlines", "v", "10000",
                        "- 0 - 0 0 -"],
             lambda k: ["EVALSHA", release, "3", k, "queue", "deadlines", "v", "", ""]),
            ("part: SET NX PX in a script + compare-and-delete",
             lambda k: ["EVALSHA", only_set, "1", k, "v", "10000"],
             lambda k: ["EVALSHA", compare_delete, "1", k, "v"]),
            ("part: EXISTS queue + SET in a script + compare-and-delete",
             lambda k: ["EVALSHA", exists_set, "2", k, "queue", "v", "10000"],
             lambda k: ["EVALSHA", compare_delete, "1", k, "v"]),
            ("part: SET + HINCRBY fence in a script + compare-and-delete",
             lambda k: ["EVALSHA", set_fence, "2", k, "node", "v", "10000"],
             lambda k: ["EVALSHA", compare_delete, "1", k, "v"]),
            ("part: SET NX PX + HINCRBY, pipelined + compare-and-delete",
             lambda k: ["SET", k, "v", "NX", "PX", "10000"],
             lambda k: ["HINCRBY", "node", "fence", "1"],
             lambda k: ["EVALSHA", compare_delete, "1", k, "v"]),
        ]
        costs = {row[0]: [] for row in rows}
        for _ in range(ROUNDS):
            for name, *commands in rows:
                costs[name].append(cycle_cost(port, commands))
        print(f"| Redis work per cycle ({ROUNDS} rounds of {CYCLES:,} cycles, median) | CPU |")
        print("|---|---:|")
        for name, *_ in rows:
            print(f"| {name} | {statistics.median(costs[name]):.2f} µs |")
    finally:
        server.terminate()
        server.wait()


if __name__ == "__main__":
    main()
