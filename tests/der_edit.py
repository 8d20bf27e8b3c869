"""Certificates OpenSSL reads but cryptography cannot, made by editing DER by hand (their
signatures no longer match, which does not matter: they must be refused before that)."""

from __future__ import annotations


def _tlv(data: bytes, i: int = 0, end: int | None = None) -> list[list[object]]:
    """A DER tree: [tag, value, children or None, long-form length]."""
    end = len(data) if end is None else end
    out: list[list[object]] = []
    while i < end:
        tag, length = data[i], data[i + 1]
        i += 2
        if length & 0x80:
            n = length & 0x7F
            length, i = int.from_bytes(data[i : i + n], "big"), i + n
        node: list[object] = [tag, data[i : i + length], None, False]
        if tag & 0x20:
            node[2] = _tlv(data, i, i + length)
        out.append(node)
        i += length
    return out


def _der(nodes: list[list[object]]) -> bytes:
    out = b""
    for tag, value, children, long_form in nodes:
        v = _der(children) if children is not None else value  # type: ignore[arg-type]
        assert isinstance(v, bytes) and isinstance(tag, int)
        n = len(v)
        if n < 0x80 and not long_form:
            length = bytes([n])
        else:
            size = max(1, (n.bit_length() + 7) // 8)
            length = bytes([0x80 | size]) + n.to_bytes(size, "big")
        out += bytes([tag]) + length + v
    return out


def non_minimal_validity(cert: bytes) -> bytes:
    """The validity's length in long form: BER, which OpenSSL reads and cryptography not."""
    tree = _tlv(cert)
    tbs = tree[0][2][0][2]  # type: ignore[index]
    tbs[4][3] = True  # version, serial, signature algorithm, issuer, validity
    return _der(tree)


def x400_in_san(cert: bytes) -> bytes:
    """An x400Address added to the SAN: a name form cryptography cannot represent."""
    tree = _tlv(cert)
    extensions = tree[0][2][0][2][-1][2][0][2]  # type: ignore[index]
    san = next(e for e in extensions if e[2][0][1] == bytes.fromhex("551d11"))
    octets = san[2][-1]
    names = _tlv(octets[1])
    names[0][2].append([0xA3, b"", [[0x30, b"", [], False]], False])  # type: ignore[union-attr]
    octets[1] = _der(names)
    return _der(tree)
