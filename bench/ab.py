"""Paired comparison of two versions of the app on P1 (first-token delay the app adds).

    .venv/bin/python bench/ab.py sqlite 50 20 HEAD~1 HEAD
    .venv/bin/python bench/ab.py pg 10 24 main main:QWENWEB_SOME_SETTING=2
    .venv/bin/python bench/ab.py sqlite 100 6 HEAD~1 HEAD --p2 --tokens 500
    .venv/bin/python bench/ab.py pg 1 30 HEAD~1 HEAD --gap 2.5   # sends after a quiet spell

On this shared machine, runs one after the other differ more than most changes do (the
eleventh and twelfth passes saw the same commit's p95 move by 2× between runs). So this
script keeps both versions up at once, each its own daphne process(es) and database, and
alternates their bursts (A then B, then B then A, ...): a slow minute of the host lands on
both. Each side is a git revision (checked out in a temporary worktree, removed at the end)
or a directory, optionally with environment variables for its processes (`rev:K=V:K2=V2`).

It prints, per side, the added delay's p50 / p95 over all sends, the median of the rounds'
p95s (one slow round moves it less), and in how many rounds B's p95 was the lower. "sqlite"
is one process on SQLite and the in-memory layer; "pg" is two on PostgreSQL and Redis (the
same configurations as bench/load.py, which this script reuses).

With --p2, each round is a P2 level instead (SENDERS streams, sent over one second, of
--tokens tokens at 50 tokens/s), and it prints the medians of the rounds' completion lag p95,
frame lag p95 and CPU per 1,000 tokens, and in how many rounds B's completion lag p95 was the
lower.
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import load  # noqa: E402
from common import print_table  # noqa: E402


def side(spec: str, keep: list[Path]) -> tuple[str, Path, dict]:
    """(label, checkout, environment) for `rev-or-dir[:K=V...]`."""
    where, *pairs = spec.split(":")
    env = dict(pair.split("=", 1) for pair in pairs)
    path = Path(where)
    if not path.is_dir():
        path = Path(tempfile.mkdtemp(prefix="qwenweb-ab-")) / "checkout"
        subprocess.run(["git", "-C", str(load.ROOT), "worktree", "add", "--detach", "-q",
                        str(path), where], check=True)  # fmt: skip
        keep.append(path)
    return spec, path, env


async def compare(kind: str, level: int, rounds: int, sides: list[tuple[str, Path, dict]],
                  p2: bool = False, gap: float = 0.2) -> None:  # fmt: skip
    data_dir = Path(tempfile.mkdtemp(prefix="qwenweb-ab-"))
    sim, sim_url = load.start_simulator(data_dir / "simulator.log")
    stacks, clients = [], []
    try:
        for n, (label, root, env) in enumerate(sides):
            processes = 1 if kind == "sqlite" else 2
            stack = load.build_stack(f"{kind}-{'AB'[n]}", processes, sim, sim_url,
                                     root=root, extra_env=env)  # fmt: skip
            stacks.append(stack)
            clients.append(load.Clients(stack, users=level, conversations=level))
            print(f"{'AB'[n]}: {label} ({root})", flush=True)
        for n in range(2):  # warm both: the first sends pay for imports and connections
            await load.p1_app(clients[n], level, 2, f"p1-warm{n}")
        if p2:
            await compare_p2(kind, level, rounds, stacks, clients)
            return
        samples: list[list[float]] = [[], []]
        round_p95: list[list[float]] = [[], []]
        for r in range(rounds):
            for n in (0, 1) if r % 2 == 0 else (1, 0):
                result = await load.p1_app(clients[n], level, 1, f"p1-{n}-{r}")
                if result["failed"]:
                    print(f"  round {r} {'AB'[n]}: {result['failed']} failed: {result['reasons']}")
                samples[n].extend(result["added"])
                round_p95[n].append(load.pct(result["added"], 0.95))
                await asyncio.sleep(gap)
        wins = sum(rb < ra for ra, rb in zip(*round_p95, strict=True))
        rows = [("side", "sends", "added p50 ms", "p95 ms", "median round p95 ms")]
        for n in range(2):
            rows.append((
                "AB"[n], len(samples[n]), load.ms(load.pct(samples[n], 0.5)),
                load.ms(load.pct(samples[n], 0.95)), load.ms(statistics.median(round_p95[n])),
            ))  # fmt: skip
        print(f"\n{kind}, {level} senders at once, {rounds} rounds each, alternated:")
        print_table(rows)
        print(f"B's round p95 lower in {wins} of {rounds} rounds")
    finally:
        for client in clients:
            await client.close()
        for stack in stacks:
            load.teardown(stack)
            shutil.rmtree(stack.data_dir, ignore_errors=True)
        sim.terminate()
        sim.wait(timeout=10)
        shutil.rmtree(data_dir, ignore_errors=True)


async def compare_p2(kind: str, level: int, rounds: int, stacks: list, clients: list) -> None:
    results: list[list[dict]] = [[], []]
    for r in range(rounds):
        for n in (0, 1) if r % 2 == 0 else (1, 0):
            pids = {f"daphne{k}": p.pid for k, p in enumerate(stacks[n].daphnes)}
            result = await load.p2_level(clients[n], level, pids, None)
            print(f"  round {r} {'AB'[n]}: completion lag p95 {load.ms(result['done95'])} ms, "
                  f"frame lag p95 {load.ms(result['lag95'])} ms, lost {result['lost']}",
                  flush=True)  # fmt: skip
            results[n].append(result)
            await asyncio.sleep(1)
    wins = sum(b["done95"] < a["done95"] for a, b in zip(*results, strict=True))
    rows = [("side", "rounds", "lost", "completion lag p95 ms", "frame lag p95 ms",
             "CPU ms / 1k tokens")]  # fmt: skip
    for n in range(2):
        rows.append((
            "AB"[n], len(results[n]), sum(x["lost"] for x in results[n]),
            load.ms(statistics.median(x["done95"] for x in results[n])),
            load.ms(statistics.median(x["lag95"] for x in results[n])),
            f"{statistics.median(x['cpu_per_ktok'] for x in results[n]):.0f}",
        ))  # fmt: skip
    print(f"\n{kind}, P2: {level} streams of {load.P2_TOKENS} tokens, {rounds} rounds each, "
          "alternated (medians of the rounds):")  # fmt: skip
    print_table(rows)
    print(f"B's completion lag p95 lower in {wins} of {rounds} rounds")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("kind", choices=["sqlite", "pg"])
    parser.add_argument("level", type=int, help="simultaneous senders")
    parser.add_argument("rounds", type=int, help="bursts per side")
    parser.add_argument("a", help="git revision or directory, then :K=V environment pairs")
    parser.add_argument("b", help="the same for the other side")
    parser.add_argument("--p2", action="store_true", help="rounds of P2 streams instead")
    parser.add_argument("--tokens", type=int, default=load.P2_TOKENS, help="tokens a P2 reply")
    parser.add_argument(
        "--gap", type=float, default=0.2,
        help="seconds after each burst (over 2: every send finds its socket's session check "
             "due, as a person's send after typing does)",
    )  # fmt: skip
    args = parser.parse_args()
    load.P2_TOKENS = args.tokens
    worktrees: list[Path] = []
    try:
        sides = [side(args.a, worktrees), side(args.b, worktrees)]
        asyncio.run(compare(args.kind, args.level, args.rounds, sides, args.p2, args.gap))
    finally:
        for path in worktrees:
            subprocess.run(["git", "-C", str(load.ROOT), "worktree", "remove", "--force",
                            str(path)], check=False)  # fmt: skip
            shutil.rmtree(path.parent, ignore_errors=True)


if __name__ == "__main__":
    main()
