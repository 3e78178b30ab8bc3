"""One record per conversation: the kernel flow records of one conversation seen on
several interfaces (observation points) of the node, merged at harvest.

The kernel keys a flow by its normalised 5-tuple, VLAN and interface, so a pod-to-pod
conversation crossing a pod veth, an overlay device and a host NIC is three kernel
records. Here they become one row (docs/features.md, "Observation points"):

* Matching: records whose keys are equal but for ``ifindex`` are one conversation
  (normalised 5-tuple + IP version + VLAN; a tagged and an untagged observation are
  different conversations, as the VLAN may separate address spaces).
* Expiry: a conversation is done when any of its records is; its other records are taken
  from the table in the same scan (:func:`due_with_siblings`), whatever their own timers
  say, so the merged row never misses an observation point that was still in the table.
  A packet arriving after that starts new records, as after any expiry: no packet is
  lost or counted twice. The row's ``expiration_id`` is the strongest reason among the
  records that were due (agent stop > TCP end > active timeout > idle timeout).
* Which counts: one observation point's record is reported as it is (its counts are not
  added to the others', which would count every packet once per interface). The order of
  preference (:func:`preference`): a record the datapath saw without encapsulation, then
  the kind of interface: pod veth, other virtual device (bridge, overlay device), physical
  NIC; then the interface where the initiator's packets were received (the first point
  on their path through the node); then the lowest ifindex. The pod veth is preferred
  because it sees the packets exactly as the pod sent and received them: sizes without
  tunnel headers and before any forwarding, so a conversation's features do not depend
  on the path it took, and the two nodes of a cross-node conversation both report their
  pods' view.
* ``seen_on``: every observation point as ``ifname:direction``, space separated, in the
  order the conversation's first packet reached them. Interface names never hold spaces
  or colons (the kernel refuses them), so the text splits unambiguously. The direction
  is how the initiator's packets crossed the interface: ``ingress`` (received on it),
  ``egress`` (sent out of it), ``ingress+egress`` (both, a packet routed back out of the
  interface it came in on: the kernel counts it once, at ingress, bpf/flow.h
  flow_hairpin); where the interface saw only the responder's packets, the opposite of
  theirs.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np
from numpy.lib import recfunctions as rfn

from xdpml.datapath.abi import SEEN_EGRESS, SEEN_INGRESS, TUNNEL_TYPES

KIND_RANK = {"veth": 0, "virtual": 1, "physical": 2}  # Attachment.kind -> preference
_OTHER_KIND = 3
DIRECTION_NAMES = {
    SEEN_INGRESS: "ingress",
    SEEN_EGRESS: "egress",
    SEEN_INGRESS | SEEN_EGRESS: "ingress+egress",
    0: "unknown",
}
# tunnel types whose packets the datapath decapsulated (the encrypted ones stay outer flows)
_DECAPSULATED = [i for i, name in enumerate(TUNNEL_TYPES) if name not in ("none", "wireguard", "esp")]
TUNNEL_FIELDS = ("tunnel_type", "tunnel_id", "outer_src_ip", "outer_dst_ip")
# the precedence of expiration ids when several records of a conversation are due, indexed
# by id + 2: -2 keep, -1 agent stop (strongest), 0 idle, 1 active, 2 TCP end
_REASON_RANK = np.array([-1, 3, 0, 1, 2], dtype=np.int64)
_RANK_REASON = np.array([-2, 0, 1, 2, -1], dtype=np.int8)  # rank + 1 -> id


# key fields two observations of one conversation may differ in: the interface, and the
# VXLAN/Geneve VNI (absent where the packets were seen unencapsulated)
_UNMATCHED = ("ifindex", "vni")


def _conversation_bytes(keys: np.ndarray) -> np.ndarray:
    """Each key without its ifindex and VNI, as one opaque value per row (comparable, sortable)."""
    names = [f for f in keys.dtype.names if f not in _UNMATCHED]
    sub = np.ascontiguousarray(rfn.repack_fields(keys[names]))
    return sub.view(f"V{sub.dtype.itemsize}").reshape(-1)


def _hash64(conv: np.ndarray) -> np.ndarray:
    """FNV-style 64-bit hash of each row (a sort key cheaper than the bytes themselves)."""
    raw = conv.view(np.uint8).reshape(len(conv), -1)
    pad = -raw.shape[1] % 8
    if pad:
        raw = np.pad(raw, ((0, 0), (0, pad)))
    words = np.ascontiguousarray(raw).view(np.uint64)
    h = np.full(len(conv), 0xCBF29CE484222325, dtype=np.uint64)
    with np.errstate(over="ignore"):
        for i in range(words.shape[1]):
            h = (h ^ words[:, i]) * np.uint64(0x100000001B3)
    return h


def _dense(x: np.ndarray) -> np.ndarray:
    return np.unique(x, return_inverse=True)[1].reshape(-1).astype(np.int64)


def conversation_ids(keys: np.ndarray) -> np.ndarray:
    """Row -> conversation number (0..k-1). Keys equal but for ifindex and VNI are one
    conversation when their nonzero VNIs agree: unencapsulated records (VNI 0) join the
    encapsulated ones if those carry a single VNI. With several VNIs (overlapping tenant
    address spaces) each VNI is a conversation of its own and the unencapsulated records
    form another; so does each VNI when one interface would hold two records of one
    conversation (its counts would be lost behind the other's)."""
    if not len(keys):
        return np.zeros(0, dtype=np.int64)
    g = _dense(_conversation_bytes(keys))
    if "vni" not in keys.dtype.names:
        return g
    vni = keys["vni"].astype(np.int64)
    nz = vni != 0
    pairs = np.unique(g[nz] << 32 | vni[nz])
    groups = pairs >> 32
    n_vni = np.bincount(groups, minlength=int(g.max()) + 1)
    only = np.zeros(len(n_vni), dtype=np.int64)
    only[groups] = pairs & 0xFFFFFFFF
    eff = np.where(~nz & (n_vni[g] == 1), only[g], vni)
    ids = _dense(g << 32 | eff)
    per_if = ids << 32 | keys["ifindex"].astype(np.int64)
    uniq, counts = np.unique(per_if, return_counts=True)
    twice = np.unique(uniq[counts > 1] >> 32)
    if len(twice):
        back = np.isin(ids, twice)
        eff[back] = vni[back]
        ids = _dense(g << 32 | eff)
    return ids


def due_with_siblings(keys: np.ndarray, reason: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Expiration ids (-2 = keep) extended to whole conversations: a record not due itself
    is taken with a due record of its conversation and gets the conversation's reason.
    Also returns each row's conversation number (-1 for rows no due record shares a
    conversation with), or None when nothing can be merged (one interface)."""
    due = reason >= -1
    if not due.any() or len(np.unique(keys["ifindex"])) < 2:
        return reason, None
    h = _hash64(_conversation_bytes(keys))
    # exact grouping only among the rows whose hash some due row shares
    cand = np.flatnonzero(np.isin(h, h[due]))
    ids = conversation_ids(keys[cand])
    rank = _REASON_RANK[reason[cand].astype(np.int64) + 2]
    best = np.full(int(ids.max()) + 1, -1, dtype=np.int64)
    np.maximum.at(best, ids, rank)
    out = reason.copy()
    out[cand] = _RANK_REASON[best + 1][ids]
    conv = np.full(len(keys), -1, dtype=np.int64)
    conv[cand] = ids
    return out, conv


def _kind_rank(ifindex: np.ndarray, kinds: Mapping[int, str]) -> np.ndarray:
    uniq, inv = np.unique(ifindex, return_inverse=True)
    ranks = np.array([KIND_RANK.get(kinds.get(int(i), ""), _OTHER_KIND) for i in uniq], dtype=np.int64)
    return ranks[inv.reshape(-1)]


def preference(
    keys: np.ndarray,
    values: np.ndarray,
    *,
    kinds: Mapping[int, str],
    encapsulated: np.ndarray | None = None,
) -> np.ndarray:
    """Record indexes, most preferred first (the order the module docstring states)."""
    n = len(keys)
    enc = np.zeros(n, dtype=np.int64) if encapsulated is None else encapsulated.astype(np.int64)
    kind = _kind_rank(keys["ifindex"], kinds)
    init_received = (values["dir"][:, 0]["seen_at"] & SEEN_INGRESS) != 0
    ifx = keys["ifindex"].astype(np.int64)
    return np.lexsort((ifx, (~init_received).astype(np.int64), kind, enc))


def _swap_sides(bits: np.ndarray) -> np.ndarray:
    return ((bits & SEEN_INGRESS) << 1 | (bits & SEEN_EGRESS) >> 1).astype(np.uint8)


def _directions(values: np.ndarray, same_initiator: np.ndarray) -> np.ndarray:
    """seen_at bits of the reported initiator's packets on each record's interface."""
    d0 = values["dir"][:, 0]["seen_at"].astype(np.uint8)
    d1 = values["dir"][:, 1]["seen_at"].astype(np.uint8)
    fwd = np.where(same_initiator, d0, d1)
    rev = np.where(same_initiator, d1, d0)
    return np.where(fwd != 0, fwd, _swap_sides(rev))


def _token_codes(ifindex: np.ndarray, bits: np.ndarray, ifnames: Mapping[int, str]) -> tuple[np.ndarray, list[str]]:
    """Each record's ``ifname:direction`` as a code into a list of distinct texts (a node
    has few interfaces: the Python work is per distinct text, not per record)."""
    pair = ifindex.astype(np.int64) * 4 + (bits.astype(np.int64) & 3)
    uniq, codes = np.unique(pair, return_inverse=True)
    texts = [f"{ifnames.get(int(p >> 2), str(int(p >> 2)))}:{DIRECTION_NAMES[int(p & 3)]}" for p in uniq]
    return codes.reshape(-1), texts


def seen_on_single(keys: np.ndarray, values: np.ndarray, ifnames: Mapping[int, str]) -> np.ndarray:
    """seen_on of records reported one per interface: each its own interface."""
    bits = _directions(values, np.ones(len(keys), dtype=bool))
    codes, texts = _token_codes(keys["ifindex"], bits, ifnames)
    return np.array(texts, dtype=object)[codes]


def _joined(ids: np.ndarray, order: np.ndarray, codes: np.ndarray, texts: list[str], k: int) -> np.ndarray:
    """Per conversation, its records' texts in ``order`` joined by spaces. Vectorised by
    group size: each distinct path is joined once."""
    sorted_ids = ids[order]
    starts = np.flatnonzero(np.r_[True, sorted_ids[1:] != sorted_ids[:-1]])
    sizes = np.diff(np.r_[starts, len(order)])
    out = np.empty(k, dtype=object)
    table = np.array(texts, dtype=object)
    for m in np.unique(sizes):
        sel = starts[sizes == m]
        rows = codes[order[sel[:, None] + np.arange(m)[None, :]]]  # (groups, m) text codes
        paths, inv = np.unique(rows, axis=0, return_inverse=True)
        joined = np.array([" ".join(table[p]) for p in paths], dtype=object)
        out[sorted_ids[sel]] = joined[inv.reshape(-1)]
    return out


def decapsulated(values: np.ndarray) -> np.ndarray:
    """Records of decapsulated packets (a tunnel type other than none or an encrypted
    tunnel, which stays the outer flow)."""
    ttype = values["tunnel_type"].astype(np.int64)
    return np.isin(ttype, _DECAPSULATED)


@dataclass
class Merged:
    """One entry per conversation, in the order of the reported records' positions."""

    reported: np.ndarray  # index of the record whose counts the row reports
    seen_on: np.ndarray  # its seen_on text
    points: np.ndarray  # its number of observation points
    tunnel: np.ndarray  # index of the record whose tunnel columns the row carries


def merge(
    keys: np.ndarray,
    values: np.ndarray,
    *,
    ifnames: Mapping[int, str],
    kinds: Mapping[int, str],
    conv: np.ndarray | None = None,
) -> Merged:
    """Records taken from the table -> one :class:`Merged` entry per conversation.
    ``conv``: the records' conversation numbers as :func:`due_with_siblings` found them
    in the whole table (so a scan groups exactly as it decided what to take); by default
    computed from these records. The tunnel columns come from the reported record when
    it was decapsulated, else from the first decapsulated one on the path, if any."""
    n = len(keys)
    if n == 0:
        e = np.zeros(0, dtype=np.int64)
        return Merged(e, np.zeros(0, dtype=object), np.zeros(0, dtype=np.uint8), e)
    if len(np.unique(keys["ifindex"])) < 2:  # one interface: nothing to merge
        ids = None
    else:
        ids = conversation_ids(keys) if conv is None else _dense(conv)
        if int(ids.max()) + 1 == n:
            ids = None
    if ids is None:
        every = np.arange(n)
        return Merged(every, seen_on_single(keys, values, ifnames), np.ones(n, dtype=np.uint8), every)
    k = int(ids.max()) + 1
    enc = decapsulated(values)
    pref = preference(keys, values, kinds=kinds, encapsulated=enc)
    rank = np.empty(n, dtype=np.int64)
    rank[pref] = np.arange(n)
    best = np.full(k, n, dtype=np.int64)
    np.minimum.at(best, ids, rank)
    reported = pref[best]  # record index per conversation
    rep_init = values["init_lo_to_hi"][reported]
    bits = _directions(values, values["init_lo_to_hi"] == rep_init[ids])
    codes, texts = _token_codes(keys["ifindex"], bits, ifnames)
    # path order: when the conversation's first packet reached each interface
    order = np.lexsort((keys["ifindex"].astype(np.int64), values["first_ns"].astype(np.int64), ids))
    seen = _joined(ids, order, codes, texts, k)
    points = np.minimum(np.bincount(ids, minlength=k), 255).astype(np.uint8)
    tunnel = reported.copy()
    on_path = order[enc[order]]  # decapsulated records, in path order
    first_conv, first_at = np.unique(ids[on_path], return_index=True)
    plain = ~enc[reported[first_conv]]
    tunnel[first_conv[plain]] = on_path[first_at[plain]]
    out = np.argsort(reported, kind="stable")
    return Merged(reported[out], seen[out], points[out], tunnel[out])
