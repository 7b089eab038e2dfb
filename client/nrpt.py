"""DNS on Windows: Name Resolution Policy Table (NRPT) rules for the pushed servers.

Setting DNS servers on the WinTun adapter alone leaves Windows free to ask the
other interfaces' servers too (it sends a query to every interface's servers
when the first is slow: a leak). An NRPT rule is binding: the DNS client sends
the names it covers to the rule's servers only.

- Split DNS (match domains pushed): one rule for those domains (NRPT wants them
  with a leading dot), so only they go to the pushed servers.
- Full tunnel (no match domains): one rule for "." (every name), together with
  the WFP filters that block port 53 outside the tunnel (client/wfp.py), as
  OpenVPN's block-outside-dns.
- A split tunnel without match domains keeps today's behaviour (the servers on
  the adapter, preferred by its low metric) and no rule.

Rules go under the local NRPT key (the DNS client reads it at once); their key
names are derived from the tunnel name (uuid5), so removal recomputes them
instead of reading a list from anywhere. NRPT takes at most 50 names per rule
(as Tailscale found), so longer lists take several rules.

Not handled: a machine whose Group Policy already defines NRPT rules ignores
local ones; we log that, and in a full tunnel the port-53 filters still keep
queries from leaving outside the tunnel.
"""

import logging
import uuid
from dataclasses import dataclass

from .winregistry import REG_DWORD, REG_MULTI_SZ, REG_SZ, Registry

log = logging.getLogger("pushgate.client.nrpt")

LOCAL_BASE = r"SYSTEM\CurrentControlSet\Services\Dnscache\Parameters\DnsPolicyConfig"
POLICY_BASE = r"SOFTWARE\Policies\Microsoft\Windows NT\DNSClient\DnsPolicyConfig"
RULE_NAMESPACE = uuid.UUID("6a1f5c44-0d3e-4b7a-8f26-70757368676e")
MAX_NAMES_PER_RULE = 50
MAX_RULES = 64
CONFIG_OPTIONS_GENERIC_DNS = 0x8  # "use GenericDNSServers for these names"
RULE_VERSION = 1


@dataclass(frozen=True)
class NrptRule:
    key: str  # the subkey name, "{guid}"
    names: tuple[str, ...]  # ".example.com", or "." for every name
    servers: tuple[str, ...]


def rule_key(tun_name: str, index: int) -> str:
    return "{" + str(uuid.uuid5(RULE_NAMESPACE, f"{tun_name}/{index}")) + "}"


def nrpt_names(domain: str) -> str:
    return "." + domain.strip().strip(".").lower()


def plan_nrpt(
    tun_name: str,
    *,
    dns_servers: list[str],
    match_domains: list[str],
    full_tunnel: bool,
) -> list[NrptRule]:
    """The rules for a session (pure)."""
    if not dns_servers:
        return []
    if match_domains:
        names = list(dict.fromkeys(nrpt_names(d) for d in match_domains if d.strip(". ")))
    elif full_tunnel:
        names = ["."]
    else:
        return []
    chunks = [
        tuple(names[i : i + MAX_NAMES_PER_RULE]) for i in range(0, len(names), MAX_NAMES_PER_RULE)
    ]
    if len(chunks) > MAX_RULES:
        raise ValueError(f"{len(names)} match domains: more than NRPT rules can hold here")
    return [
        NrptRule(rule_key(tun_name, index), chunk, tuple(dns_servers))
        for index, chunk in enumerate(chunks)
    ]


def rule_values(rule: NrptRule) -> dict:
    return {
        "Version": (REG_DWORD, RULE_VERSION),
        "Name": (REG_MULTI_SZ, list(rule.names)),
        "GenericDNSServers": (REG_SZ, "; ".join(rule.servers)),
        "ConfigOptions": (REG_DWORD, CONFIG_OPTIONS_GENERIC_DNS),
        "IPSECCARestriction": (REG_SZ, ""),
    }


class Nrpt:
    def __init__(self, registry: Registry | None = None) -> None:
        self._registry = registry if registry is not None else Registry()

    def remove(self, tun_name: str, first: int = 0) -> int:
        """Delete the rules of `tun_name` (keys first, first + 1, ... up to the first
        missing); how many went."""
        for index in range(first, MAX_RULES):
            if not self._registry.delete(rf"{LOCAL_BASE}\{rule_key(tun_name, index)}"):
                return index - first
        return MAX_RULES - first

    def apply(self, tun_name: str, rules: list[NrptRule]) -> None:
        """Replace the rules of `tun_name` with `rules`: each key written over in
        place, then the keys past the new ones deleted, so a live change never
        leaves the DNS client a moment without the tunnel's rules."""
        ours = {rule_key(tun_name, i) for i in range(MAX_RULES)}
        foreign = [k for k in self._registry.subkeys(POLICY_BASE) if k not in ours]
        if rules and foreign:
            log.warning(
                "Group Policy defines NRPT rules (%d): Windows ignores our local rules, "
                "so the pushed DNS servers are set on the adapter only",
                len(foreign),
            )
        for rule in rules:
            self._registry.write(rf"{LOCAL_BASE}\{rule.key}", rule_values(rule))
        self.remove(tun_name, first=len(rules))
