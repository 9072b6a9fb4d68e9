"""Run `flwr` commands against a private local SuperLink or a loopback deployment (a real
`flower-superlink` and `flower-supernode`s on 127.0.0.1), and stop every process started."""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from simulations.load_probe import OFFLINE_ENV, processes_with_env

VENV_BIN = Path(sys.executable).parent  # flower-superlink, flower-supernode, flwr, ...


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def offline_env(flwr_home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
    """This process's environment, offline, with its own FLWR_HOME and this venv's scripts
    first on PATH (SuperNodes and SuperLinks start `flower-superexec`/`flwr-*` by name)."""
    return {**os.environ, **OFFLINE_ENV, "FLWR_HOME": str(flwr_home),
            "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}", **(extra or {})}


def private_env(flwr_home: Path, ray_tmp: Path) -> dict[str, str]:
    """Environment for `flwr`: its own FLWR_HOME and ports, offline, Ray files in ray_tmp."""
    return {**os.environ, **OFFLINE_ENV, "FLWR_HOME": str(flwr_home), "RAY_TMPDIR": str(ray_tmp),
            "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(free_port()),
            "FLWR_LOCAL_CONTROL_API_PORT": str(free_port())}


@contextmanager
def local_superlink_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    """The environment for `flwr run` on a private local SuperLink (simulation).

    On exit, stops every process that has this FLWR_HOME (also after a failure), removes the
    Ray folder, and checks that nothing is left.
    """
    home = tmp_path / "flwr-home"
    ray_tmp = Path(tempfile.mkdtemp(prefix="hp-ray-"))  # short: Ray's socket paths are limited
    env = private_env(home, ray_tmp)
    env["PATH"] = f"{VENV_BIN}{os.pathsep}{env['PATH']}"
    try:
        yield env
    finally:
        stop_processes_with_home(home)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert processes_with_home(home) == []


def processes_with_home(flwr_home: Path) -> list[int]:
    """PIDs whose environment has FLWR_HOME=flwr_home (the SuperLink, SuperExec, simulation and
    every Ray process inherit it, even after being re-parented to PID 1)."""
    return processes_with_env("FLWR_HOME", str(flwr_home))


def stop_processes_with_home(flwr_home: Path, grace: float = 15.0) -> list[int]:
    """SIGTERM everything started under ``flwr_home``, SIGKILL what is left after ``grace``."""
    pids = processes_with_home(flwr_home)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and processes_with_home(flwr_home):
            time.sleep(0.2)
    return pids


def stop_popen(procs: Sequence[subprocess.Popen], grace: float = 10.0) -> None:
    """SIGTERM the processes we started (by PID), wait up to ``grace`` s, then SIGKILL."""
    for proc in procs:
        if proc.poll() is None:
            proc.terminate()
    deadline = time.monotonic() + grace
    for proc in procs:
        try:
            proc.wait(timeout=max(deadline - time.monotonic(), 0.01))
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=grace)


def run_flwr(args: list[str], env: dict[str, str], cwd: Path, timeout: float) -> str:
    """Run `flwr ARGS`; returns stdout+stderr (the CLI exits 0 even when the ServerApp fails)."""
    done = subprocess.run(["flwr", *args], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, check=False)
    output = done.stdout + done.stderr
    if done.returncode != 0:
        raise AssertionError(f"flwr {' '.join(args)} exited {done.returncode}:\n{output}")
    return output


# --- certificates and keys ----------------------------------------------------------------


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of a self-signed CA and a server certificate it signed."""

    ca_cert: Path
    server_cert: Path
    server_key: Path


def make_tls_files(directory: Path, hosts: Sequence[str] = ("127.0.0.1", "localhost"),
                   days: int = 2) -> TlsFiles:
    """Write a self-signed CA and a server certificate for ``hosts`` (IPs or DNS names).

    Same result as the usual openssl recipe (CA + server key, CSR with subjectAltName, signed
    by the CA), done with `cryptography`, which flwr depends on.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    def name(common_name: str) -> x509.Name:
        return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])

    def alt_name(host: str) -> x509.GeneralName:
        try:
            return x509.IPAddress(ipaddress.ip_address(host))
        except ValueError:
            return x509.DNSName(host)

    now = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(minutes=5)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_cert = (x509.CertificateBuilder().subject_name(name("flwr-hyperprism test CA"))
               .issuer_name(name("flwr-hyperprism test CA")).public_key(ca_key.public_key())
               .serial_number(x509.random_serial_number()).not_valid_before(now)
               .not_valid_after(now + datetime.timedelta(days=days))
               .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
               .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True,
                                            crl_sign=True, content_commitment=False,
                                            key_encipherment=False, data_encipherment=False,
                                            key_agreement=False, encipher_only=False,
                                            decipher_only=False), critical=True)
               .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()),
                              critical=False)
               .sign(ca_key, hashes.SHA256()))
    key = ec.generate_private_key(ec.SECP256R1())
    cert = (x509.CertificateBuilder().subject_name(name(hosts[0])).issuer_name(ca_cert.subject)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now).not_valid_after(now + datetime.timedelta(days=days))
            .add_extension(x509.SubjectAlternativeName([alt_name(h) for h in hosts]),
                           critical=False)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]),
                           critical=False)
            .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(
                ca_key.public_key()), critical=False)
            .sign(ca_key, hashes.SHA256()))
    directory.mkdir(parents=True, exist_ok=True)
    files = TlsFiles(directory / "ca.crt", directory / "server.pem", directory / "server.key")
    files.ca_cert.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    files.server_cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    files.server_key.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                                   serialization.PrivateFormat.PKCS8,
                                                   serialization.NoEncryption()))
    files.server_key.chmod(0o600)
    return files


def make_supernode_keys(private_key: Path) -> Path:
    """Write a SuperNode authentication key pair: an EC P-384 private key in OpenSSH format
    at ``private_key`` (what `flower-supernode --auth-supernode-private-key` loads) and its
    OpenSSH public key next to it with `.pub` (what `flwr supernode register` takes), as
    `ssh-keygen -t ecdsa -b 384 -N '' -f <private_key>` does. Returns the public key path."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec

    key = ec.generate_private_key(ec.SECP384R1())
    private_key.parent.mkdir(parents=True, exist_ok=True)
    private_key.write_bytes(key.private_bytes(serialization.Encoding.PEM,
                                              serialization.PrivateFormat.OpenSSH,
                                              serialization.NoEncryption()))
    private_key.chmod(0o600)
    public_key = private_key.with_name(private_key.name + ".pub")
    public_key.write_bytes(key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                                         serialization.PublicFormat.OpenSSH))
    return public_key


# --- loopback deployment ------------------------------------------------------------------


def write_cli_connection(flwr_home: Path, name: str, address: str,
                         root_certificates: Path | None = None) -> Path:
    """Add a SuperLink connection ``name`` to the CLI config ``flwr_home/config.toml``:
    TLS with ``root_certificates`` (the CA that signed the SuperLink's certificate), or
    ``insecure = true`` without it."""
    flwr_home.mkdir(parents=True, exist_ok=True)
    security = (f'root-certificates = "{root_certificates}"' if root_certificates
                else "insecure = true")
    config = flwr_home / "config.toml"
    with open(config, "a") as out:
        out.write(f'\n[superlink.{name}]\naddress = "{address}"\n{security}\n')
    return config


def wait_for_health(address: str, ca_cert: Path | None, timeout: float = 60.0,
                    process: subprocess.Popen | None = None) -> None:
    """Poll the SuperLink's `GET /health` (https when ``ca_cert`` is given) until it answers."""
    scheme, context = ("https", ssl.create_default_context(cafile=str(ca_cert))) if ca_cert \
        else ("http", None)
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(f"{scheme}://{address}/health", timeout=2,
                                        context=context) as response:
                if response.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the SuperLink exited with {process.returncode}")
        if time.monotonic() > deadline:
            raise AssertionError(f"the SuperLink at {address} is not healthy after {timeout}s")
        time.sleep(0.1)


@dataclass
class Fleet:
    """A running loopback deployment: one SuperLink, SuperNodes and a CLI configured for it.

    Every process has its own FLWR_HOME under ``root`` (as on separate machines) and logs to
    ``root/logs/<name>.log``. ``cli_env`` runs `flwr` with the connection ``connection``.
    """

    root: Path
    address: str
    connection: str
    cli_env: dict[str, str]
    tls: TlsFiles | None = None
    env_extra: dict[str, str] = field(default_factory=dict)
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    homes: list[Path] = field(default_factory=list)

    def home(self, name: str) -> Path:
        """The FLWR_HOME of process ``name`` (``superlink``, ``supernode-<i>``, ...)."""
        return self.root / f"{name}-home"

    def log(self, name: str) -> str:
        """What process ``name`` has logged so far."""
        return (self.root / "logs" / f"{name}.log").read_text(errors="replace")

    def flwr(self, args: list[str], timeout: float = 300.0) -> str:
        """Run `flwr ARGS` with the fleet's CLI config (from ``root``)."""
        return run_flwr(args, self.cli_env, cwd=self.root, timeout=timeout)

    def start(self, name: str, command: list[str]) -> subprocess.Popen:
        """Start ``command`` as process ``name`` with its own FLWR_HOME (``home(name)``),
        offline, logging to ``root/logs/<name>.log``."""
        logs, home = self.root / "logs", self.home(name)
        logs.mkdir(parents=True, exist_ok=True)
        home.mkdir(parents=True, exist_ok=True)
        self.homes.append(home)
        with open(logs / f"{name}.log", "wb") as log_file:
            proc = subprocess.Popen(command, env=offline_env(home, self.env_extra), cwd=home,
                                    stdout=log_file, stderr=subprocess.STDOUT)
        self.processes[name] = proc
        return proc

    def start_supernode(self, name: str, partition_id: int, num_partitions: int,
                        private_key: Path | None = None, node_config: str = ""
                        ) -> subprocess.Popen:
        """Start a SuperNode holding partition ``partition_id`` of ``num_partitions``;
        ``private_key`` enables SuperNode authentication (OpenSSH EC key); ``node_config``
        adds node config entries (e.g. ``state-dir='/path'``)."""
        security = ["--root-certificates", str(self.tls.ca_cert)] if self.tls else ["--insecure"]
        auth = ["--auth-supernode-private-key", str(private_key)] if private_key else []
        return self.start(name, [
            "flower-supernode", "--superlink", self.address, *security, *auth,
            "--host", "127.0.0.1", "--port", str(free_port()),
            "--node-config",
            f"partition-id={partition_id} num-partitions={num_partitions} {node_config}".strip()])

    def start_flwr(self, name: str, args: list[str]) -> subprocess.Popen:
        """Start `flwr ARGS` in the background as process ``name`` (logs in ``log(name)``)."""
        logs = self.root / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        with open(logs / f"{name}.log", "wb") as log_file:
            proc = subprocess.Popen(["flwr", *args], env=self.cli_env, cwd=self.root,
                                    stdout=log_file, stderr=subprocess.STDOUT)
        self.processes[name] = proc
        return proc

    def serverapps(self) -> list[int]:
        """PIDs of the `flwr-serverapp` processes the SuperLink's SuperExec runs now."""
        return [pid for pid in processes_with_home(self.home("superlink"))
                if b"flwr-serverapp" in _cmdline(pid)]

    def leftovers(self) -> list[int]:
        """PIDs still running from this fleet: its processes and every child (SuperExec,
        flwr-serverapp, flwr-clientapp) found by the private FLWR_HOMEs in their environment."""
        alive = [p.pid for p in self.processes.values() if p.poll() is None]
        return sorted(set(alive) | {pid for home in self.homes
                                    for pid in processes_with_home(home)})

    def stop(self) -> None:
        """Stop the SuperNodes, then the SuperLink, by PID; then their children by FLWR_HOME."""
        stop_popen([p for name, p in self.processes.items() if name != "superlink"])
        stop_popen([p for name, p in self.processes.items() if name == "superlink"])
        for home in self.homes:
            stop_processes_with_home(home, grace=10.0)


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


@contextmanager
def loopback_fleet(root: Path, num_nodes: int, tls: TlsFiles | None = None,
                   supernode_auth: bool = False, env_extra: Mapping[str, str] | None = None,
                   connection: str = "loopback",
                   node_config: Callable[[int], str] | None = None) -> Iterator[Fleet]:
    """Start a SuperLink and ``num_nodes`` SuperNodes on 127.0.0.1 (free ports); stop them all.

    With ``tls`` the SuperLink serves its Fleet, Control and Runtime APIs with that
    certificate and everyone verifies it with its CA; without, everything is ``--insecure``
    (local testing only). ``supernode_auth`` (needs ``tls``) starts the SuperLink with
    ``--enable-supernode-auth`` and registers each SuperNode's public key with
    `flwr supernode register` before the SuperNode starts with its private key. SuperNode i
    (process ``supernode-<i>``) gets ``--node-config "partition-id=i num-partitions=N"``.
    ``node_config(i)`` adds node config entries for SuperNode i. ``env_extra`` goes into
    every daemon's environment (e.g. FLWR_SUPEREXEC_TASK_POLL_INTERVAL). The SuperNodes are
    started, not waited for: the orchestrator waits for its ``num-nodes``. On exit every
    process is stopped, also when the body raises.
    """
    if supernode_auth and tls is None:
        raise ValueError("SuperNode authentication needs TLS")
    address = f"127.0.0.1:{free_port()}"
    cli_home = root / "cli-home"
    fleet = Fleet(root, address, connection, offline_env(cli_home), tls, dict(env_extra or {}),
                  homes=[cli_home])
    write_cli_connection(cli_home, connection, address, tls.ca_cert if tls else None)
    security = (["--ssl-ca-certfile", str(tls.ca_cert), "--ssl-certfile", str(tls.server_cert),
                 "--ssl-keyfile", str(tls.server_key)] if tls else ["--insecure"])
    try:
        host, port = address.rsplit(":", 1)
        superlink = fleet.start("superlink", [
            "flower-superlink", *security, "--host", host, "--port", port,
            "--database", str(fleet.home("superlink") / "state.db"),
            "--disable-runtime-dependency-installation",
            *(["--enable-supernode-auth"] if supernode_auth else [])])
        wait_for_health(address, tls.ca_cert if tls else None, process=superlink)
        for i in range(num_nodes):
            name, key = f"supernode-{i}", None
            if supernode_auth:
                key = fleet.home(name) / "supernode-key"
                public_key = make_supernode_keys(key)
                fleet.flwr(["supernode", "register", str(public_key), connection], timeout=60)
            fleet.start_supernode(name, i, num_nodes, key,
                                  node_config(i) if node_config else "")
        yield fleet
    finally:
        fleet.stop()


# --- Flower App Bundles -------------------------------------------------------------------


def copy_app(app: Path, dest: Path) -> Path:
    """Copy the files of ``app`` that `flwr build`/`flwr run` consider (its .gitignore and
    Flower's publish filter applied, so no .venv or outputs) to ``dest``; returns ``dest``.
    A FAB built from the copy is byte for byte the one `flwr run <app>` ships."""
    with warnings.catch_warnings():  # pathspec's DeprecationWarnings, one per pattern
        warnings.simplefilter("ignore", DeprecationWarning)
        from flwr.cli.utils import collect_files, filter_paths_for_publish

        files = filter_paths_for_publish(collect_files(app.resolve()))
    for relative, source in files.items():
        target = dest / relative
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(source.read_bytes() if isinstance(source, Path) else source)
    return dest


def build_fab(app: Path, workdir: Path, env: dict[str, str]) -> Path:
    """`flwr build` a copy of ``app`` (named ``hyperprism``: `flwr build` wants a valid app
    name as directory name) in ``workdir``; returns the .fab file, also in ``workdir``."""
    copy = copy_app(app, workdir / "hyperprism")
    before = set(workdir.glob("*.fab"))
    run_flwr(["build", "--app", str(copy)], env, cwd=workdir, timeout=120)
    (fab,) = set(workdir.glob("*.fab")) - before
    return fab
