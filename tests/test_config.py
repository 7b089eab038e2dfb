"""The gateway config: typos and impossible values are refused with the file, the line
and the key; `init` checks everything before it writes anything; a port in use is one
line and exit status 2; `user add` refuses names Login refuses. CLI output is checked
on the real commands."""

import dataclasses
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from auth_service.user_names import user_name_problem
from netlab import Lab
from pushgate_io import gateway_config as config

BIN = os.path.dirname(sys.executable)


def run(tool: str, *args: str, env: dict | None = None, **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [os.path.join(BIN, tool), *args],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=60,
        env=env,
        **kwargs,
    )


def init(directory, *args: str) -> subprocess.CompletedProcess:
    return run(
        "pushgate-admin",
        "init",
        "--dir",
        str(directory),
        "--dataplane-endpoint",
        "198.18.0.1:51820",
        "--server-name",
        "198.18.0.1",
        *args,
    )


@pytest.fixture(scope="module")
def written(tmp_path_factory) -> tuple[str, str]:
    """(path, text) of a config as `init` writes it."""
    directory = tmp_path_factory.mktemp("gateway")
    result = init(directory, "--control-group", "pushgate", "--dataplane-user", "pgdp")
    assert result.returncode == 0, result.stderr
    path = str(directory / "pushgate.toml")
    with open(path) as handle:
        return path, handle.read()


OPTIONAL_SECTIONS = ("oidc", "cluster")  # init writes them commented out


def line_of(text: str, start: str) -> int:
    return next(n for n, line in enumerate(text.splitlines(), 1) if line.startswith(start))


# -- unknown sections and keys ----------------------------------------------------


@pytest.mark.parametrize(
    ("old", "new", "message"),
    [
        (
            'metrics_listen = "127.0.0.1:9101"',
            'metric_listen = "127.0.0.1:9101"',
            "[auth] metric_listen: unknown key; did you mean metrics_listen?",
        ),
        ("[dataplane]", "[dataplan]", "[dataplan]: unknown section; did you mean [dataplane]?"),
        ("reflection = false", "mtu = 1400", "[auth] mtu: unknown key; it belongs in [gateway]"),
        ("reflection = false", "colour = 1", "[auth] colour: unknown key"),
        (
            "[gateway]",
            "mtu = 1400\n[gateway]",
            "mtu: a key outside every [section]; it belongs under [gateway]",
        ),
        (
            "[auth]",
            "[extras]\n[auth]",
            "[extras]: unknown section; the sections are [gateway], [auth], [dataplane],"
            " [oidc], [cluster]",
        ),
    ],
)
def test_unknown_names_are_refused_with_file_line_and_a_suggestion(
    written, tmp_path, old, new, message
):
    _, text = written
    changed = text.replace(old, new, 1)
    path = tmp_path / "pushgate.toml"
    path.write_text(changed)
    expected_line = changed[: changed.index(new)].count("\n") + 1
    with pytest.raises(config.ConfigError) as caught:
        config.load(str(path), auth=True)
    assert str(caught.value) == f"{path}:{expected_line}: {message}"


def test_both_services_refuse_a_typo_with_one_line_and_status_2(written, tmp_path):
    _, text = written
    path = tmp_path / "pushgate.toml"
    path.write_text(text.replace("metrics_listen = ", "metric_listen = ", 1))
    line = line_of(path.read_text(), "metric_listen")
    expected = f"{path}:{line}: [auth] metric_listen: unknown key; did you mean metrics_listen?"
    for tool in ("pushgate-auth", "pushgate-dataplane"):
        result = run(tool, "--config", str(path))
        assert result.returncode == 2, (tool, result.stderr)
        assert result.stderr == f"{tool}: {expected}\n"


def test_every_key_init_writes_is_read_and_every_key_read_is_written(tmp_path):
    """The sections' fields are the keys: the check and the code cannot disagree."""
    result = init(
        tmp_path,
        *("--control-group", "pushgate", "--dataplane-user", "pgdp"),
        *("--database-url-file", "/etc/pushgate/database-url"),
    )
    assert result.returncode == 0, result.stderr
    path = str(tmp_path / "pushgate.toml")
    text = Path(path).read_text()
    lines = config.definition_lines(text)
    for section, kind in config.SECTIONS.items():
        fields = {field.name for field in dataclasses.fields(kind)}
        if section in OPTIONAL_SECTIONS:  # written commented out, as an example
            example = re.search(rf"(?ms)^# \[{section}\]\n(.*?)\n\n", text).group(1)
            in_file = set(re.findall(r"(?m)^# (\w+) = ", example))
        else:
            in_file = {key for (name, *rest) in lines if name == section and rest for key in rest}
        assert in_file == fields, section
    loaded = config.load(path, auth=True)
    assert loaded.gateway.control_group == "pushgate" and loaded.dataplane.user == "pgdp"


def test_value_errors_name_file_line_and_key(written, tmp_path):
    _, text = written
    path = tmp_path / "pushgate.toml"
    path.write_text(text.replace("mtu = 1420", 'mtu = "big"'))
    with pytest.raises(config.ConfigError) as caught:
        config.load(str(path))
    line = line_of(text, "mtu = ")
    assert str(caught.value) == f"{path}:{line}: [gateway] mtu: expected a number, got 'big'"


# -- where keys are: the scanner ----------------------------------------------------

TRICKY = """\
# a comment with key = "value" in it
title = 'top'
[gateway]   # a comment
tunnel_network = "198.19.0.0/24"
routes = [
  "a = b",   # looks like a key, is an array element
  '''[not.a.table]''',
]
note = \"\"\"
mtu = 1
[dataplane]
\"\"\"
"quoted key" = 1
'literal.key' = 2
dotted . key = 3
inline = { a = 1, b = [1,
]}
[[servers]]
name = "x"
[ auth . "tls" ]
cert = "c"
"""


def test_definition_lines_find_keys_only_where_they_are_defined():
    lines = config.definition_lines(TRICKY)
    assert lines == {
        ("title",): 2,
        ("gateway",): 3,
        ("gateway", "tunnel_network"): 4,
        ("gateway", "routes"): 5,
        ("gateway", "note"): 9,
        ("gateway", "quoted key"): 13,
        ("gateway", "literal.key"): 14,
        ("gateway", "dotted"): 15,
        ("gateway", "dotted", "key"): 15,
        ("gateway", "inline"): 16,
        ("servers",): 18,
        ("servers", "name"): 19,
        ("auth",): 20,
        ("auth", "tls"): 20,
        ("auth", "tls", "cert"): 21,
    }


# -- values that cannot work ----------------------------------------------------------

BASE = """\
[gateway]
tunnel_network = "{network}"
gateway_address = "{gateway}"
"""


@pytest.mark.parametrize(
    ("network", "gateway", "message"),
    [
        ("198.19.0.0/24", "198.19.0.0", "198.19.0.0 is the network address of 198.19.0.0/24"),
        ("198.19.0.0/24", "198.19.0.255", "198.19.0.255 is the broadcast address"),
        ("198.19.0.0/30", "198.19.0.1", "leaves 1 address(es) for clients"),
        ("198.19.0.0/31", "198.19.0.0", "leaves 1 address(es) for clients"),
        ("198.19.0.1/32", "198.19.0.1", "leaves 0 address(es) for clients"),
        ("2001:db8::/64", "2001:db8::1", "2001:db8::/64 is IPv6; tunnel networks are IPv4 only"),
    ],
)
def test_impossible_tunnel_networks_are_refused(tmp_path, network, gateway, message):
    path = tmp_path / "pushgate.toml"
    path.write_text(BASE.format(network=network, gateway=gateway))
    with pytest.raises(config.ConfigError, match=rf"^{path}:\d: \[gateway\] .*") as caught:
        config.load(str(path))
    assert message in str(caught.value)


@pytest.mark.parametrize(("network", "gateway"), [("198.19.0.0/29", "198.19.0.6")])
def test_the_smallest_network_that_works_is_accepted(tmp_path, network, gateway):
    path = tmp_path / "pushgate.toml"
    path.write_text(BASE.format(network=network, gateway=gateway))
    assert config.load(str(path)).gateway.tunnel_network.prefixlen == 29


# -- init checks everything before it writes ---------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--route", "0.0.0.0/0", "--route", "198.18.2.3/15"],
            "--route: 198.18.2.3/15 has host bits set",
        ),
        (["--tunnel-network", "2001:db8::/64"], "--tunnel-network: 2001:db8::/64 is IPv6"),
        (["--tunnel-network", "198.19.0.0/30"], "--tunnel-network: 198.19.0.0/30 leaves 1"),
        (["--tunnel-network", "198.19.0.0/33"], "--tunnel-network: "),
        (["--gateway-address", "198.19.0.255"], "--gateway-address: 198.19.0.255 is the broad"),
        (["--dns", "198.18.0.530"], "--dns: '198.18.0.530' does not appear to be"),
        (["--deny-network", "management"], "--deny-network: 'management' does not appear"),
        (["--offer", "sctp 198.19.0.1:9"], "--offer: 'sctp 198.19.0.1:9': expected \"ping"),
        (["--auth-listen", "0.0.0.0:74430"], "--auth-listen: expected HOST:PORT"),
        (["--dataplane-listen", "0.0.0.0"], "--dataplane-listen: expected HOST:PORT"),
        (["--server-name", "vpn example"], "--server-name: 'vpn example' is neither an IP"),
        (["--ca-key-out", "/nonexistent-dir/ca.key"], "--ca-key-out: no directory for"),
    ],
)
def test_init_refuses_bad_values_before_writing_anything(tmp_path, args, message):
    directory = tmp_path / "gateway"
    result = init(directory, *args)
    assert result.returncode == 2
    assert result.stderr.startswith(f"pushgate-admin init: {message}"), result.stderr
    assert result.stderr.endswith("(nothing written)\n") and result.stderr.count("\n") == 1
    assert not directory.exists()


def test_init_values_cannot_add_config_lines(tmp_path):
    """A value is one TOML string, whatever it holds: no line of its own sneaks in."""
    result = init(tmp_path / "gateway", "--dataplane-user", 'pgdp"\nreflection = true #')
    assert result.returncode == 0, result.stderr
    loaded = config.load(str(tmp_path / "gateway" / "pushgate.toml"), auth=True)
    assert loaded.dataplane.user == 'pgdp"\nreflection = true #'
    assert loaded.auth.reflection is False


# -- user names ---------------------------------------------------------------------


@pytest.mark.parametrize("name", ["tab\there", "line\nbreak", "x" * 257, "é" * 129])
def test_user_add_refuses_names_login_refuses(written, name):
    path, _ = written
    assert user_name_problem(name)  # what Login answers INVALID_ARGUMENT for
    result = run(
        "pushgate-admin",
        "user",
        "add",
        name,
        "--config",
        path,
        env={**os.environ, "PUSHGATE_PASSWORD": "pw"},
    )
    assert result.returncode == 2
    assert "user name must be 1-256 printable bytes" in result.stderr
    listed = run("pushgate-admin", "user", "list", "--config", path)
    assert name not in listed.stdout


def test_user_add_takes_a_name_login_takes(written):
    path, _ = written
    name = "Zoë O'Brien" + "x" * 200
    assert user_name_problem(name) is None
    env = {**os.environ, "PUSHGATE_PASSWORD": "pw"}
    result = run("pushgate-admin", "user", "add", name, "--config", path, env=env)
    assert result.returncode == 0, result.stderr


# -- a port in use ------------------------------------------------------------------


def held(kind: int, port: int = 0) -> socket.socket:
    sock = socket.socket(socket.AF_INET, kind)
    sock.bind(("127.0.0.1", port))
    if kind == socket.SOCK_STREAM:
        sock.listen()
    return sock


@pytest.mark.processes
@pytest.mark.parametrize(("key", "what"), [("listen", "the client API"), ("metrics", "metrics")])
def test_auth_port_in_use_is_one_line_and_status_2(tmp_path, key, what):
    with held(socket.SOCK_STREAM) as taken, held(socket.SOCK_STREAM) as other:
        port, free = taken.getsockname()[1], other.getsockname()[1]
        other.close()  # a port that was free a moment ago, for the other listener
        listen, metrics = (port, free) if key == "listen" else (free, port)
        result = init(tmp_path / "gateway", "--auth-listen", f"127.0.0.1:{listen}")
        assert result.returncode == 0, result.stderr
        path = tmp_path / "gateway" / "pushgate.toml"
        path.write_text(path.read_text().replace("127.0.0.1:9101", f"127.0.0.1:{metrics}"))
        result = run("pushgate-auth", "--config", str(path))
    name = "[auth] listen" if key == "listen" else "[auth] metrics_listen"
    assert result.returncode == 2
    assert result.stderr == (
        f"pushgate-auth: cannot listen on 127.0.0.1:{port} for {what} ({name}): "
        "address already in use\n"
    )


@pytest.mark.netns
@pytest.mark.parametrize("key", ["listen", "metrics_listen"])
def test_dataplane_port_in_use_is_one_line_and_status_2(tmp_path, key):
    """In a namespace of its own: were the port not refused, it would go on to make a TUN."""
    assert init(tmp_path / "gateway").returncode == 0
    path = tmp_path / "gateway" / "pushgate.toml"
    with Lab("pgcfg") as lab:
        ns = lab.namespace("dp")
        code = (
            "import socket,sys,subprocess;"
            "kind=socket.SOCK_DGRAM if sys.argv[1]=='listen' else socket.SOCK_STREAM;"
            "s=socket.socket(socket.AF_INET,kind);s.bind(('127.0.0.1',40000));"
            "kind==socket.SOCK_STREAM and s.listen();"
            "r=subprocess.run(sys.argv[2:],capture_output=True,text=True,timeout=30);"
            "sys.stderr.write(r.stderr);sys.exit(r.returncode)"
        )
        result = lab.exec(
            ns,
            [
                sys.executable,
                "-c",
                code,
                key,
                os.path.join(BIN, "pushgate-dataplane"),
                "--config",
                str(path),
                f"--{key.replace('_', '-')}",
                "127.0.0.1:40000",
            ],
            check=False,
        )
        tun = lab.exec(ns, ["ip", "-o", "link", "show", "type", "tun"]).stdout
    what = "push packets" if key == "listen" else "metrics"
    assert result.returncode == 2
    assert result.stderr == (
        f"pushgate-dataplane: cannot listen on 127.0.0.1:40000 for {what} "
        f"([dataplane] {key}): address already in use\n"
    )
    assert tun == ""  # it stopped before making its TUN


def test_the_database_url_file_must_be_private_and_hold_a_postgresql_url(tmp_path):
    """`[auth] database_url_file` is a secret: a file others can read (or its group
    write) is refused, and so is one that holds no postgresql:// URL; the error never
    shows what the file holds. Its group may read it (Kubernetes' fsGroup)."""
    url_file = tmp_path / "database-url"
    path = tmp_path / "pushgate.toml"
    path.write_text(
        '[gateway]\ntunnel_network = "198.19.0.0/24"\ngateway_address = "198.19.0.1"\n'
        '[auth]\ndataplane_endpoint = "198.18.0.1:51820"\n'
        f'database_url_file = "{url_file}"\n'
    )
    auth = config.load(str(path), auth=True).auth
    assert auth.database_url_file == str(url_file)
    with pytest.raises(config.ConfigError, match="No such file"):
        config.database_location(auth)
    url_file.write_text("postgresql://gw:s3cret@db.example/pushgate\n")
    for mode in (0o644, 0o660, 0o604):
        url_file.chmod(mode)
        with pytest.raises(config.ConfigError, match="open to others or writable") as caught:
            config.database_location(auth)
        assert "s3cret" not in str(caught.value)
    url_file.chmod(0o440)
    assert config.database_location(auth) == "postgresql://gw:s3cret@db.example/pushgate"
    url_file.chmod(0o600)
    url_file.write_text("mysql://gw:s3cret@db/pushgate\n")
    with pytest.raises(config.ConfigError, match="postgresql:// URL") as caught:
        config.database_location(auth)
    assert "s3cret" not in str(caught.value)
    path.write_text(path.read_text().replace(f'database_url_file = "{url_file}"\n', ""))
    plain = config.load(str(path), auth=True).auth
    assert config.database_location(plain) == plain.database  # SQLite, the default


# -- [cluster]: several gateways clients fail over between -------------------------


def uncommented_cluster(text: str) -> str:
    """The config with init's commented-out [cluster] example switched on."""
    example = re.search(r"(?ms)^# \[cluster\]\n.*?\n\n", text).group(0)
    return text.replace(example, re.sub(r"(?m)^# ", "", example))


def test_the_cluster_example_init_writes_loads_sorted_by_preference(written, tmp_path, monkeypatch):
    monkeypatch.delenv(config.GATEWAY_ID_ENVIRONMENT, raising=False)
    path = tmp_path / "pushgate.toml"
    path.write_text(uncommented_cluster(written[1]))
    cluster = config.load(str(path), auth=True).cluster
    assert cluster.gateway_id == "gw-a" and cluster.this.id == "gw-a"
    assert [(g.id, g.auth, g.dataplane, g.preference) for g in cluster.gateways] == [
        ("gw-a", ("gw-a.example", 8443), ("gw-a.example", 51820), 10),
        ("gw-b", ("gw-b.example", 8443), ("gw-b.example", 51820), 20),
    ]
    # One config for every host (a Kubernetes ConfigMap): the environment names it.
    monkeypatch.setenv(config.GATEWAY_ID_ENVIRONMENT, "gw-b")
    assert config.load(str(path), auth=True).cluster.this.dataplane == ("gw-b.example", 51820)
    assert config.load(str(written[0]), auth=True).cluster is None  # a lone gateway


@pytest.mark.parametrize(
    ("old", "new", "problem"),
    [
        (
            'gateway_id = "gw-a"',
            'gateway_id = "gw-c"',
            "'gw-c' is not among the gateways (gw-a, gw-b)",
        ),
        ('id = "gw-b"', 'id = "gw-a"', "gateways: entry 2: id 'gw-a' is listed twice"),
        ('id = "gw-b"', 'id = "gw b"', "gateways: entry 2: id 'gw b' must be 1-63 letters"),
        (
            "preference = 20",
            "preference = -1",
            "gateways: entry 2: preference -1 is out of 0..65535",
        ),
        ("preference = 20", 'preference = "2"', "gateways: entry 2: preference must be an integer"),
        (
            'auth = "gw-b.example:8443"',
            'auth = "gw-b"',
            "gateways: entry 2: expected HOST:PORT",
        ),
        ('dataplane = "gw-b.example:51820", ', "", "gateways: entry 2: dataplane is required"),
        ("preference = 20", "weight = 2", "gateways: entry 2: unknown key 'weight'"),
    ],
)
def test_a_wrong_cluster_is_refused_with_its_entry_and_why(
    written, tmp_path, monkeypatch, old, new, problem
):
    monkeypatch.delenv(config.GATEWAY_ID_ENVIRONMENT, raising=False)
    text = uncommented_cluster(written[1])
    start = text.index("[cluster]")
    path = tmp_path / "pushgate.toml"
    path.write_text(text[:start] + text[start:].replace(old, new, 1))
    with pytest.raises(config.ConfigError) as caught:
        config.load(str(path), auth=True)
    assert "[cluster]" in str(caught.value) and problem in str(caught.value)
