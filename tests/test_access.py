"""Access policy, auth side: [groups.NAME] parsing (every error with file, line and
reason), each user's AccessPolicy and NetworkConfig (pure), group membership in the
store."""

import os
import subprocess
import sys

import pytest

from auth_service.access import AccessModel, canonical, joining_problem
from auth_service.store import NoSuchUser, Store
from pushgate_io import gateway_config as config

BIN = os.path.dirname(sys.executable)


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> str:
    """A config as `init` writes it (tunnel 198.19.0.0/24, gateway .1, DNS offered)."""
    directory = tmp_path_factory.mktemp("gateway")
    result = subprocess.run(
        [
            os.path.join(BIN, "pushgate-admin"),
            *("init", "--dir", str(directory), "--dataplane-endpoint", "198.18.0.1:51820"),
            *("--dns", "198.19.0.1", "--route", "198.18.0.0/16"),
        ],
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    with open(directory / "pushgate.toml") as handle:
        return handle.read()


def load(tmp_path, text: str) -> config.GatewayConfig:
    path = tmp_path / "pushgate.toml"
    path.write_text(text)
    return config.load(str(path), auth=True)


GROUPS = """
[groups.eng]
allow = [
  "198.18.2.10/32",
  "198.18.3.0/24 tcp 22,443,8000-8999",
  "198.18.3.0/24 udp 53",
  "198.18.3.0/24 icmp",
]
dns_servers = ["198.18.2.53"]
search_domains = ["eng.example"]
match_domains = ["eng.example", "corp.example"]

[groups.sales]
allow = ["198.18.4.0/24 tcp 443", "198.19.0.0/24 icmp"]
routes = ["198.18.4.0/23"]
dns_servers = ["198.18.4.53", "198.18.2.53"]
match_domains = ["Sales.Example."]
"""


def test_groups_are_read_in_file_order(base, tmp_path):
    cfg = load(tmp_path, base + GROUPS)
    eng, sales = cfg.groups
    assert (eng.name, sales.name) == ("eng", "sales")
    assert [config.rule_text(r) for r in eng.allow] == [
        "198.18.2.10/32",
        "198.18.3.0/24 tcp 22,443,8000-8999",
        "198.18.3.0/24 udp 53",
        "198.18.3.0/24 icmp",
    ]
    assert eng.routes is None and [str(n) for n in sales.routes] == ["198.18.4.0/23"]
    assert sales.match_domains == ("sales.example",)


def test_no_groups_table_is_the_compatibility_mode(base, tmp_path):
    assert load(tmp_path, base).groups is None
    # the dataplane does not read them
    path = tmp_path / "pushgate.toml"
    assert config.load(str(path)).groups is None


@pytest.mark.parametrize(
    ("group", "line", "message"),
    [
        (
            'allow = ["198.18.3.1/24"]',
            2,
            "'198.18.3.1/24': '198.18.3.1/24' has host bits set; did you mean 198.18.3.0/24?",
        ),
        (
            'allow = ["198.18.300.0/24"]',
            2,
            "'198.18.300.0/24': '198.18.300.0/24' is not a prefix (e.g. 198.18.2.0/24)",
        ),
        (
            'allow = ["2001:db8::/32"]',
            2,
            "'2001:db8::/32': '2001:db8::/32' is IPv6; the tunnel carries IPv4 only",
        ),
        (
            'allow = ["198.18.3.0/24 gre"]',
            2,
            "'198.18.3.0/24 gre': unknown protocol 'gre': use "
            "tcp, udp, icmp, any or a number 1..255",
        ),
        (
            'allow = ["198.18.3.0/24 tcp 0"]',
            2,
            "'198.18.3.0/24 tcp 0': port 0 is out of range 1..65535",
        ),
        (
            'allow = ["198.18.3.0/24 tcp 90-80"]',
            2,
            "'198.18.3.0/24 tcp 90-80': port range 90-80 is backwards; did you mean 80-90?",
        ),
        (
            'allow = ["198.18.3.0/24 tcp 22,20-30"]',
            2,
            "'198.18.3.0/24 tcp 22,20-30': port ranges overlap in '22,20-30'",
        ),
        (
            'allow = ["198.18.3.0/24 tcp ssh"]',
            2,
            "'198.18.3.0/24 tcp ssh': 'ssh' is not a port or a range FIRST-LAST",
        ),
        (
            'allow = ["198.18.3.0/24 icmp 8"]',
            2,
            "'198.18.3.0/24 icmp 8': ports apply to tcp and udp only, not icmp",
        ),
        (
            'allow = ["198.18.3.0/24 any 80"]',
            2,
            "'198.18.3.0/24 any 80': ports apply to tcp and udp only, not any",
        ),
        (
            'allow = [\n  "198.18.3.0/24",\n  "198.18.3.0/25 tcp 22",\n]',
            4,
            "'198.18.3.0/25 tcp 22' is already allowed by '198.18.3.0/24' (line {l3}); remove one",
        ),
        (
            'allow = [\n  "198.18.3.0/24 udp 53",\n  "198.18.3.0/24 udp 53",\n]',
            4,
            "'198.18.3.0/24 udp 53' repeats '198.18.3.0/24 udp 53' (line {l3}); remove one",
        ),
        (
            'allow = ["198.19.0.1/32 tcp 22"]',
            2,
            "'198.19.0.1/32 tcp 22': 198.19.0.1 is the gateway's own address; clients reach "
            "it only for [dataplane] offered_services (ping, udp 53, tcp 53): allow those alone",
        ),
        (
            'allow = ["198.19.0.1"]',
            2,
            "'198.19.0.1': 198.19.0.1 is the gateway's own "
            "address; clients reach it only for [dataplane] offered_services (ping, udp 53, tcp "
            "53): allow those alone",
        ),
    ],
)
def test_wrong_rules_are_refused_with_file_line_and_reason(base, tmp_path, group, line, message):
    text = base + "\n[groups.eng]\n" + group + "\n"
    first = base.count("\n") + 2  # the [groups.eng] line
    with pytest.raises(config.ConfigError) as caught:
        load(tmp_path, text)
    path = tmp_path / "pushgate.toml"
    message = message.replace("{l3}", str(first + 2))
    assert str(caught.value) == f"{path}:{first + line - 1}: [groups.eng] allow: {message}"


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ('alow = ["198.18.3.0/24"]', "[groups.eng] alow: unknown key; did you mean allow?"),
        (
            'colour = "red"',
            "[groups.eng] colour: unknown key; a group has allow, routes, "
            "dns_servers, search_domains, match_domains",
        ),
        (
            'routes = ["198.18.3.1/24"]',
            "[groups.eng] routes: '198.18.3.1/24': '198.18.3.1/24' "
            "has host bits set; did you mean 198.18.3.0/24?",
        ),
        (
            'dns_servers = ["dns.example"]',
            "[groups.eng] dns_servers: 'dns.example': "
            "'dns.example' does not appear to be an IPv4 or IPv6 address",
        ),
        (
            'match_domains = ["bad domain"]',
            "[groups.eng] match_domains: 'bad domain': 'bad domain' is not a domain name",
        ),
        ('allow = "198.18.3.0/24"', "[groups.eng] allow: expected list, got '198.18.3.0/24'"),
    ],
)
def test_wrong_group_keys_are_refused_with_file_line_and_reason(base, tmp_path, body, message):
    with pytest.raises(config.ConfigError) as caught:
        load(tmp_path, base + "\n[groups.eng]\n" + body + "\n")
    assert str(caught.value) == f"{tmp_path / 'pushgate.toml'}:{base.count(chr(10)) + 3}: {message}"


def test_group_names_and_shapes(base, tmp_path):
    with pytest.raises(config.ConfigError, match=r":\d+: \[groups.e ng\]: a group name is"):
        load(tmp_path, base + '\n[groups."e ng"]\nallow = []\n')
    with pytest.raises(config.ConfigError, match=r":\d+: \[groups\]: must be tables"):
        load(tmp_path, base.replace("[gateway]", "groups = 1\n[gateway]"))
    with pytest.raises(config.ConfigError, match=r"did you mean \[groups.NAME\]\?"):
        load(tmp_path, base + "\n[group.eng]\nallow = []\n")


def test_a_rule_on_an_offered_service_of_the_gateway_is_accepted(base, tmp_path):
    cfg = load(
        tmp_path, base + '\n[groups.all]\nallow = ["198.19.0.1/32 udp 53", "198.19.0.1 icmp"]\n'
    )
    assert len(cfg.groups[0].allow) == 2


def test_rules_inside_a_denied_network_are_refused(base, tmp_path):
    text = base.replace("deny_networks = []", 'deny_networks = ["198.18.9.0/24"]')
    with pytest.raises(config.ConfigError, match="inside \\[dataplane\\] deny_networks"):
        load(tmp_path, text + '\n[groups.eng]\nallow = ["198.18.9.7/32 tcp 22"]\n')


# -- per user: AccessPolicy and NetworkConfig (pure) ----------------------------------


def rules_of(policy) -> list[str]:
    return [
        f"{r.destination} {r.protocol} {','.join(f'{p.first}-{p.last}' for p in r.ports)}".strip()
        for r in policy.allow
    ]


OFFERED = ["198.19.0.1/32 1", "198.19.0.1/32 6 53-53", "198.19.0.1/32 17 53-53"]


def test_a_policy_is_the_union_of_the_groups_rules_and_the_offered_services(base, tmp_path):
    model = AccessModel.from_config(load(tmp_path, base + GROUPS))
    assert rules_of(model.policy([])) == OFFERED  # default deny
    assert rules_of(model.policy(["eng"])) == [
        "198.18.2.10/32 0",
        "198.18.3.0/24 1",
        "198.18.3.0/24 6 22-22,443-443,8000-8999",
        "198.18.3.0/24 17 53-53",
        *OFFERED,
    ]
    both = model.policy(["sales", "eng", "undeclared"])
    assert rules_of(both) == [
        "198.18.2.10/32 0",
        "198.18.3.0/24 1",
        "198.18.3.0/24 6 22-22,443-443,8000-8999",
        "198.18.3.0/24 17 53-53",
        "198.18.4.0/24 6 443-443",
        "198.19.0.0/24 1",  # client-to-client, ping only
        *OFFERED,
    ]
    assert both.digest == model.policy(["eng", "sales"]).digest
    assert len({both.digest, model.policy(["eng"]).digest, model.policy([]).digest}) == 3


def test_canonical_merges_ports_and_drops_duplicates():
    rules = [
        config.parse_rule(t)
        for t in (
            "198.18.3.0/24 tcp 22",
            "198.18.3.0/24 tcp 23-30",
            "198.18.3.0/24 tcp 22",
            "198.18.1.0/24",
            "198.18.1.0/24 tcp 80",
            "198.18.3.0/24 udp 1-5",
        )
    ]
    assert [config.rule_text(r) for r in canonical(rules)] == [
        "198.18.1.0/24",
        "198.18.1.0/24 tcp 80",
        "198.18.3.0/24 tcp 22-30",
        "198.18.3.0/24 udp 1-5",
    ]


def test_group_all_applies_to_everyone(base, tmp_path):
    model = AccessModel.from_config(
        load(tmp_path, base + GROUPS + '\n[groups.all]\nallow = ["198.18.5.5/32 tcp 80"]\n')
    )
    assert "198.18.5.5/32 6 80-80" in rules_of(model.policy([]))
    assert "198.18.5.5/32 6 80-80" in rules_of(model.policy(["eng"]))


def test_network_config_per_user(base, tmp_path):
    model = AccessModel.from_config(load(tmp_path, base + GROUPS))
    eng = model.network(["eng"])
    assert list(eng.routes) == ["198.18.2.10/32", "198.18.3.0/24"]  # derived from allow
    assert list(eng.dns_servers) == ["198.19.0.1", "198.18.2.53"]  # [auth] dns first
    assert list(eng.search_domains) == ["eng.example"]
    assert list(eng.match_domains) == ["eng.example", "corp.example"]
    both = model.network(["sales", "eng"])
    # sales' routes override its own rules' (and the tunnel network is not routed)
    assert list(both.routes) == ["198.18.2.10/32", "198.18.3.0/24", "198.18.4.0/23"]
    assert list(both.dns_servers) == ["198.19.0.1", "198.18.2.53", "198.18.4.53"]
    assert list(both.match_domains) == ["eng.example", "corp.example", "sales.example"]
    assert len({eng.digest, both.digest, model.network([]).digest}) == 3
    assert model.network(["eng"]).digest == eng.digest


def test_compatibility_mode_keeps_todays_reach_without_client_to_client(base, tmp_path):
    model = AccessModel.from_config(load(tmp_path, base))  # routes 198.18.0.0/16
    assert rules_of(model.policy(["whatever"])) == ["198.18.0.0/16 0", *OFFERED]
    network = model.network([])
    assert list(network.routes) == ["198.18.0.0/16"] and list(network.dns_servers) == ["198.19.0.1"]
    full = AccessModel.from_config(load(tmp_path, base.replace('"198.18.0.0/16"', '"0.0.0.0/0"')))
    policy = rules_of(full.policy([]))
    assert "198.19.0.0/24 0" not in policy and "0.0.0.0/1 0" in policy
    assert "198.19.1.0/24 0" in policy and "198.19.0.1/32 1" in policy
    assert len(policy) == 24 + 3


# -- membership in the store -------------------------------------------------------


def test_membership_is_the_union_of_admin_and_identity_provider(tmp_path):
    store = Store(str(tmp_path / "db"))
    for name in ("alice", "bob"):
        store.add_user(name, "$argon2-not-used", 1.0)
    assert store.add_members("eng", ["alice", "bob", "alice"]) == ["alice", "bob"]
    assert store.add_members("eng", ["alice"]) == []
    assert store.replace_user_groups("alice", ["eng", "sales"], "idp")
    assert not store.replace_user_groups("alice", ["sales", "eng"], "idp")
    assert store.groups_of("alice") == ["eng", "sales"]
    assert store.memberships("eng") == {"eng": {"alice": ["admin", "idp"], "bob": ["admin"]}}
    assert store.replace_user_groups("alice", [], "idp")
    assert store.groups_of("alice") == ["eng"]
    assert store.remove_members("eng", ["alice"]) == ["alice"]
    assert store.groups_of("alice") == []
    with pytest.raises(NoSuchUser):
        store.add_members("eng", ["carol"])
    with pytest.raises(ValueError, match="source"):
        store.replace_user_groups("bob", ["eng"], "ldap")
    store.remove_user("bob")
    store.add_user("bob", "$argon2-not-used", 2.0)
    assert store.groups_of("bob") == []  # a namesake inherits nothing
    store.close()


def test_who_may_join_which_group(base, tmp_path):
    compat = AccessModel.from_config(load(tmp_path, base))
    assert "declares no [groups.*]" in joining_problem(compat, "eng")
    model = AccessModel.from_config(
        load(tmp_path, base + GROUPS + '\n[groups.all]\nallow = ["198.18.5.5/32"]\n')
    )
    assert joining_problem(model, "eng") is None
    assert joining_problem(model, "ops") == (
        "no group 'ops' in the config (declared: eng, sales, all)"
    )
    assert "applies to every user" in joining_problem(model, "all")
