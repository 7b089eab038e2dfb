"""An in-memory Windows Filtering Platform that answers fwpuclnt.dll's calls.

It decodes every structure the caller passes (through the same ctypes
declarations client/wfp.py uses on Windows), refuses what the real engine
refuses (an unknown layer, a condition whose value type does not fit its field,
a duplicate key, a sublayer of an unknown provider, deleting what is in use),
keeps transactions (nothing is visible before commit; abort discards), keeps
persistent objects across an engine handle closed without cleanup (a crash)
and across a reboot, and drops non-persistent or dynamic-session ones as WFP
does. `decide` classifies a connection the way WFP arbitrates inside our
sublayer: the matching filter of highest weight decides; none matching, the
connection is permitted.

What it cannot tell: whether Windows accepts these calls the same way
(argument passing, RPC, the base filtering engine's own checks), and the
arbitration with other providers' sublayers. Only a real Windows machine does.
"""

import copy
import ctypes
import ipaddress
import itertools
import uuid
from dataclasses import dataclass, field
from types import SimpleNamespace

from client import wfp

FWP_E_INVALID_PARAMETER = 0x80320035
FWP_E_NO_TXN_IN_PROGRESS = 0x8032000D
FWP_E_TXN_IN_PROGRESS = 0x8032000E
FWP_E_TYPE_MISMATCH = 0x8032002A

LAYER_NAMES = {key: name for name, key in wfp.LAYERS.items()}
FIELD_NAMES = {key: name for name, key in wfp.FIELDS.items()}
# The value types each field accepts at the ALE layers.
FIELD_TYPES = {
    "remote_address": {wfp.FWP_V4_ADDR_MASK, wfp.FWP_V6_ADDR_MASK, wfp.FWP_UINT32,
                       wfp.FWP_BYTE_ARRAY16_TYPE},
    "remote_port": {wfp.FWP_UINT16},
    "local_port": {wfp.FWP_UINT16},
    "protocol": {wfp.FWP_UINT8},
    "local_interface": {wfp.FWP_UINT64},
    "flags": {wfp.FWP_UINT32},
}  # fmt: skip


def read_text(address: int | None) -> str:
    from client.wintun import read_wide

    return read_wide(address)


@dataclass
class FakeCondition:
    field: str
    match: int
    kind: int
    value: object  # int, or (network) for address masks

    def matches(self, packet: dict) -> bool:
        actual = packet.get(self.field)
        if actual is None:
            return False
        if self.kind in (wfp.FWP_V4_ADDR_MASK, wfp.FWP_V6_ADDR_MASK):
            return ipaddress.ip_address(actual) in self.value
        if self.match == wfp.FWP_MATCH_FLAGS_ALL_SET:
            return actual & self.value == self.value
        return actual == self.value


@dataclass
class FakeFilter:
    key: uuid.UUID
    name: str
    layer: str
    sublayer: uuid.UUID
    provider: uuid.UUID | None
    persistent: bool
    weight: int
    action: str
    conditions: list[FakeCondition]
    session: int

    def matches(self, packet: dict) -> bool:
        by_field: dict[str, list[FakeCondition]] = {}
        for condition in self.conditions:
            by_field.setdefault(condition.field, []).append(condition)
        # Conditions on different fields: all must hold; on one field: any.
        return all(any(c.matches(packet) for c in group) for group in by_field.values())


@dataclass
class State:
    providers: dict[uuid.UUID, dict] = field(default_factory=dict)
    sublayers: dict[uuid.UUID, dict] = field(default_factory=dict)
    filters: dict[uuid.UUID, FakeFilter] = field(default_factory=dict)


class FakeWfp:
    def __init__(self) -> None:
        self.state = State()
        self.sessions: dict[int, dict] = {}
        self._handles = itertools.count(0x1000)
        self.commits: list[State] = []  # every committed state, in order
        self.calls: list[str] = []
        self.fail_filter_add_at: int | None = None  # fail the Nth FwpmFilterAdd0
        self._filter_adds = 0

    def library(self) -> SimpleNamespace:
        names = [name for name in dir(self) if name.startswith("Fwpm")]

        def export(name):
            method = getattr(self, name)

            def call(*args):
                self.calls.append(name)
                return method(*args)

            return call

        return SimpleNamespace(**{name: export(name) for name in names})

    # -- helpers ---------------------------------------------------------------------

    def _view(self, engine) -> State:
        session = self.sessions[engine]
        return session["txn"] if session["txn"] is not None else self.state

    def _changed(self, engine) -> None:
        if self.sessions[engine]["txn"] is None:
            self.commits.append(copy.deepcopy(self.state))

    @staticmethod
    def _guid(value) -> uuid.UUID:
        return value.to_uuid()

    # -- engine and transactions -----------------------------------------------------

    def FwpmEngineOpen0(self, server, authn, auth_identity, session, handle):
        if server is not None or authn != wfp.RPC_C_AUTHN_WINNT or auth_identity is not None:
            return FWP_E_INVALID_PARAMETER
        number = next(self._handles)
        flags = session._obj.flags if session is not None else 0
        self.sessions[number] = {"dynamic": bool(flags & 0x1), "txn": None}
        handle._obj.value = number
        return 0

    def FwpmEngineClose0(self, engine):
        session = self.sessions.pop(engine)
        if session["dynamic"]:  # a dynamic session's objects go with it
            self._drop(lambda owner: owner == engine)
        return 0

    def crash(self) -> None:
        """The client process dies: Windows closes its engine handles."""
        for engine in list(self.sessions):
            self.sessions[engine]["txn"] = None  # an open transaction is aborted
            self.FwpmEngineClose0(engine)

    def reboot(self) -> None:
        self.crash()
        self._drop(lambda owner: True, keep_persistent=True)

    def _drop(self, owned, keep_persistent: bool = False) -> None:
        state = self.state
        for key, item in list(state.filters.items()):
            if owned(item.session) and not (keep_persistent and item.persistent):
                del state.filters[key]
        for table in (state.sublayers, state.providers):
            for key, item in list(table.items()):
                if owned(item["session"]) and not (keep_persistent and item["persistent"]):
                    del table[key]

    def FwpmTransactionBegin0(self, engine, flags):
        session = self.sessions[engine]
        if session["txn"] is not None:
            return FWP_E_TXN_IN_PROGRESS
        session["txn"] = copy.deepcopy(self.state)
        return 0

    def FwpmTransactionCommit0(self, engine):
        session = self.sessions[engine]
        if session["txn"] is None:
            return FWP_E_NO_TXN_IN_PROGRESS
        self.state, session["txn"] = session["txn"], None
        self.commits.append(copy.deepcopy(self.state))
        return 0

    def FwpmTransactionAbort0(self, engine):
        session = self.sessions[engine]
        if session["txn"] is None:
            return FWP_E_NO_TXN_IN_PROGRESS
        session["txn"] = None
        return 0

    # -- providers and sublayers ---------------------------------------------------

    def FwpmProviderAdd0(self, engine, provider, security):
        view, row = self._view(engine), provider._obj
        key = self._guid(row.providerKey)
        if key in view.providers:
            return wfp.FWP_E_ALREADY_EXISTS
        view.providers[key] = {
            "name": read_text(row.displayData.name),
            "persistent": bool(row.flags & wfp.FWPM_PROVIDER_FLAG_PERSISTENT),
            "session": engine,
        }
        self._changed(engine)
        return 0

    def FwpmProviderDeleteByKey0(self, engine, key):
        view, key = self._view(engine), self._guid(key._obj)
        if key not in view.providers:
            return wfp.FWP_E_PROVIDER_NOT_FOUND
        users = [s for s in view.sublayers.values() if s["provider"] == key]
        if users or any(f.provider == key for f in view.filters.values()):
            return wfp.FWP_E_IN_USE
        del view.providers[key]
        self._changed(engine)
        return 0

    def FwpmSubLayerAdd0(self, engine, sublayer, security):
        view, row = self._view(engine), sublayer._obj
        key = self._guid(row.subLayerKey)
        if key in view.sublayers:
            return wfp.FWP_E_ALREADY_EXISTS
        provider = self._guid(row.providerKey.contents) if row.providerKey else None
        if provider is not None and provider not in view.providers:
            return wfp.FWP_E_PROVIDER_NOT_FOUND
        view.sublayers[key] = {
            "name": read_text(row.displayData.name),
            "provider": provider,
            "weight": row.weight,
            "persistent": bool(row.flags & wfp.FWPM_SUBLAYER_FLAG_PERSISTENT),
            "session": engine,
        }
        self._changed(engine)
        return 0

    def FwpmSubLayerDeleteByKey0(self, engine, key):
        view, key = self._view(engine), self._guid(key._obj)
        if key not in view.sublayers:
            return wfp.FWP_E_SUBLAYER_NOT_FOUND
        if any(f.sublayer == key for f in view.filters.values()):
            return wfp.FWP_E_IN_USE
        del view.sublayers[key]
        self._changed(engine)
        return 0

    # -- filters -------------------------------------------------------------------

    def _decode_condition(self, item, version: int) -> FakeCondition | int:
        field_name = FIELD_NAMES.get(self._guid(item.fieldKey))
        if field_name is None:
            return FWP_E_INVALID_PARAMETER
        value = item.conditionValue
        if value.type not in FIELD_TYPES[field_name]:
            return FWP_E_TYPE_MISMATCH
        if value.type == wfp.FWP_V4_ADDR_MASK:
            if version != 4:
                return FWP_E_TYPE_MISMATCH
            mask = value.v4AddrMask.contents
            network = ipaddress.ip_network(
                (ipaddress.IPv4Address(mask.addr), str(ipaddress.IPv4Address(mask.mask)))
            )
            decoded = network
        elif value.type == wfp.FWP_V6_ADDR_MASK:
            if version != 6:
                return FWP_E_TYPE_MISMATCH
            mask6 = value.v6AddrMask.contents
            decoded = ipaddress.ip_network(
                (ipaddress.IPv6Address(bytes(mask6.addr)), mask6.prefixLength)
            )
        elif value.type == wfp.FWP_UINT8:
            decoded = value.uint8
        elif value.type == wfp.FWP_UINT16:
            decoded = value.uint16
        elif value.type == wfp.FWP_UINT32:
            decoded = value.uint32
        elif value.type == wfp.FWP_UINT64:
            decoded = value.uint64.contents.value
        else:
            return FWP_E_TYPE_MISMATCH
        if item.matchType == wfp.FWP_MATCH_FLAGS_ALL_SET and field_name != "flags":
            return FWP_E_INVALID_PARAMETER
        return FakeCondition(field_name, item.matchType, value.type, decoded)

    def FwpmFilterAdd0(self, engine, filter_row, security, filter_id):
        self._filter_adds += 1
        if self.fail_filter_add_at == self._filter_adds:
            return 0x80070005  # E_ACCESSDENIED
        view, row = self._view(engine), filter_row._obj
        key = self._guid(row.filterKey)
        layer = LAYER_NAMES.get(self._guid(row.layerKey))
        sublayer = self._guid(row.subLayerKey)
        if layer is None:
            return 0x80320004  # FWP_E_LAYER_NOT_FOUND
        if sublayer not in view.sublayers:
            return wfp.FWP_E_SUBLAYER_NOT_FOUND
        if key in view.filters:
            return wfp.FWP_E_ALREADY_EXISTS
        provider = self._guid(row.providerKey.contents) if row.providerKey else None
        if provider is not None and provider not in view.providers:
            return wfp.FWP_E_PROVIDER_NOT_FOUND
        if row.weight.type != wfp.FWP_UINT8 or row.weight.uint8 > 15:
            return FWP_E_INVALID_PARAMETER
        actions = {wfp.FWP_ACTION_PERMIT: "permit", wfp.FWP_ACTION_BLOCK: "block"}
        if row.action.type not in actions:
            return FWP_E_INVALID_PARAMETER
        version = 6 if layer.endswith("v6") else 4
        conditions = []
        for index in range(row.numFilterConditions):
            decoded = self._decode_condition(row.filterCondition[index], version)
            if isinstance(decoded, int):
                return decoded
            conditions.append(decoded)
        view.filters[key] = FakeFilter(
            key=key,
            name=read_text(row.displayData.name),
            layer=layer,
            sublayer=sublayer,
            provider=provider,
            persistent=bool(row.flags & wfp.FWPM_FILTER_FLAG_PERSISTENT),
            weight=row.weight.uint8,
            action=actions[row.action.type],
            conditions=conditions,
            session=engine,
        )
        if filter_id is not None:
            ctypes.cast(filter_id, ctypes.POINTER(ctypes.c_uint64))[0] = len(view.filters)
        self._changed(engine)
        return 0

    def FwpmFilterDeleteByKey0(self, engine, key):
        view, key = self._view(engine), self._guid(key._obj)
        if key not in view.filters:
            return wfp.FWP_E_FILTER_NOT_FOUND
        del view.filters[key]
        self._changed(engine)
        return 0

    # -- what a connection meets ---------------------------------------------------

    def decide(self, layer: str, state: State | None = None, **packet) -> str:
        """permit | block for a connection at `layer` (as WFP arbitrates inside one
        sublayer: the matching filter of highest weight)."""
        state = state or self.state
        candidates = [f for f in state.filters.values() if f.layer == layer and f.matches(packet)]
        if not candidates:
            return "permit"
        best = max(candidates, key=lambda f: (state.sublayers[f.sublayer]["weight"], f.weight))
        return best.action
