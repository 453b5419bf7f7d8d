#!/usr/bin/env python3
"""CPU seconds per component for `herald bench` workloads.

Runs each named workload once (`herald bench W --runs 1 -q`) against a private
Postgres cluster and a private Redis that this script starts on spare ports,
so that every CPU second of those servers belongs to the workload, and prints
how many CPU seconds Postgres, Redis and Herald (the bench process and the
relay/worker processes it starts) spent, beside the wall time. CPU time,
unlike throughput, hardly depends on what else the machine is doing, so this
is how docs/scaling.md says what one Postgres core carries.

    scripts/cpu-split.py [--herald target/release/herald] [--tls] O4 O2 Q2 O1

With --tls the private server has ssl on (a self-signed certificate made
with openssl) and Herald connects with sslmode=require; without it,
sslmode=disable.

Needs the Debian Postgres binaries (/usr/lib/postgresql/*/bin) and
redis-server; run as root (it initdb's as the postgres user) or as a user
that can run initdb.
"""
import argparse, glob, json, os, pwd, shutil, socket, subprocess, sys, tempfile, time

TICK = os.sysconf("SC_CLK_TCK")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_cpu(pid, children=False):
    """utime+stime (and cutime+cstime of waited-for children) in seconds."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / TICK


def tree_cpu(root):
    """CPU of a postmaster: its own, its exited (waited) backends', its live ones'."""
    total = proc_cpu(root, children=True)
    for path in glob.glob("/proc/[0-9]*/stat"):
        try:
            with open(path) as f:
                fields = f.read().rsplit(")", 1)[1].split()
            if int(fields[1]) == root:
                total += (int(fields[11]) + int(fields[12])) / TICK
        except (OSError, ValueError, IndexError):
            pass
    return total


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--herald", default="target/release/herald")
    ap.add_argument("--tls", action="store_true", help="ssl on, sslmode=require")
    ap.add_argument("workloads", nargs="+")
    args = ap.parse_args()
    herald = os.path.abspath(args.herald)
    bindir = sorted(glob.glob("/usr/lib/postgresql/*/bin"))[-1]
    tmp = tempfile.mkdtemp(prefix="herald-cpu-")
    data = os.path.join(tmp, "pg")
    as_pg = []
    if os.geteuid() == 0:
        pg_user = pwd.getpwnam("postgres")
        os.chown(tmp, pg_user.pw_uid, pg_user.pw_gid)
        as_pg = ["runuser", "-u", "postgres", "--"]
    pg_port, redis_port = free_port(), free_port()
    subprocess.run(as_pg + [f"{bindir}/initdb", "-D", data, "-A", "trust", "-U", "postgres"],
                   check=True, stdout=subprocess.DEVNULL)
    tls = []
    if args.tls:
        cert, key = os.path.join(data, "server.crt"), os.path.join(data, "server.key")
        subprocess.run(as_pg + ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                                "-subj", "/CN=localhost", "-keyout", key, "-out", cert],
                       check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        tls = ["-c", "ssl=on", "-c", f"ssl_cert_file={cert}", "-c", f"ssl_key_file={key}"]
    pg = subprocess.Popen(as_pg + [f"{bindir}/postgres", "-D", data, "-p", str(pg_port),
                                   "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={tmp}",
                                   "-c", "max_connections=300"] + tls,
                          stdout=subprocess.DEVNULL, stderr=open(os.path.join(tmp, "pg.log"), "w"))
    redis = subprocess.Popen(["redis-server", "--port", str(redis_port), "--bind", "127.0.0.1",
                              "--save", "", "--appendonly", "no"], stdout=subprocess.DEVNULL)
    try:
        for _ in range(100):
            if subprocess.run([f"{bindir}/pg_isready", "-q", "-h", "127.0.0.1", "-p", str(pg_port)]).returncode == 0:
                break
            time.sleep(0.1)
        # runuser execs postgres, so pg.pid is the postmaster (or runuser's child).
        postmaster = int(open(os.path.join(data, "postmaster.pid")).readline())
        env = dict(os.environ,
                   DATABASE_URL=f"postgres://postgres@127.0.0.1:{pg_port}/postgres"
                                f"?sslmode={'require' if args.tls else 'disable'}",
                   REDIS_URL=f"redis://127.0.0.1:{redis_port}")
        print("| workload | wall s | Postgres CPU s | Herald CPU s | Redis CPU s | figures |")
        print("|---|---:|---:|---:|---:|---|")
        for w in args.workloads:
            pg0, r0, h0, t0 = tree_cpu(postmaster), proc_cpu(redis.pid), os.times(), time.monotonic()
            out = subprocess.run([herald, "bench", w, "--runs", "1", "-q"], env=env,
                                 capture_output=True, text=True)
            t1, h1 = time.monotonic(), os.times()
            pg1, r1 = tree_cpu(postmaster), proc_cpu(redis.pid)
            if out.returncode != 0:
                print(out.stdout, out.stderr, file=sys.stderr)
                raise SystemExit(f"bench {w} failed")
            figures = {}
            for line in out.stdout.splitlines():
                if line.startswith("{"):
                    figures = json.loads(line)
            herald_cpu = (h1.children_user + h1.children_system) - (h0.children_user + h0.children_system)
            print(f"| {w} | {t1 - t0:.1f} | {pg1 - pg0:.2f} | {herald_cpu:.2f} | {r1 - r0:.2f} | "
                  f"{json.dumps(figures, separators=(',', ':'))} |", flush=True)
    finally:
        redis.terminate()
        subprocess.run(as_pg + [f"{bindir}/pg_ctl", "-D", data, "stop", "-m", "fast"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        pg.wait(timeout=30)
        redis.wait(timeout=30)
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
