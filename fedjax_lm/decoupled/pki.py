"""A job's certificate authority for the decoupled channel's mutual TLS, in one command.

    python -m fedjax_lm.decoupled.pki DIR --hosts 10.0.0.5,syncer.example.org --islands 4

writes (Python's ``cryptography``, no ``openssl`` binary needed; ECDSA P-256 keys, each
readable by its owner only; no private key leaves DIR):

* ``ca.pem`` / ``ca.key``: the job's CA (keep ``ca.key`` off the islands);
* ``syncer.pem`` / ``syncer.key``: the syncer's certificate, valid for ``--hosts`` (IPs or
  DNS names; loopback is always included);
* ``island<k>.pem`` / ``island<k>.key`` for k < ``--islands``: one client certificate per
  island (CN ``island-<k>``).

Then start the syncer with ``--config.launch.tls_ca=DIR/ca.pem
--config.launch.tls_cert=DIR/syncer.pem --config.launch.tls_key=DIR/syncer.key`` and island k
with its own pair. Mutual TLS is required when the syncer listens on a non-loopback interface
(``launch.plaintext=True`` to opt out, e.g. inside a VPN); the per-island keys still decide
who is a member.
"""

from __future__ import annotations

import argparse
import datetime
import ipaddress
import os
import sys

from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from cryptography.x509.oid import NameOID


def _names(hosts: list[str]) -> list[x509.GeneralName]:
  """Subject alternative names: loopback always, then each host as an IP or a DNS name."""
  names = []
  for h in dict.fromkeys(["127.0.0.1", "localhost", *hosts]):
    try:
      names.append(x509.IPAddress(ipaddress.ip_address(h)))
    except ValueError:
      names.append(x509.DNSName(h))
  return names


def _write(path: str, data: bytes, private: bool = False) -> None:
  fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600 if private else 0o644)
  with os.fdopen(fd, "wb") as f:
    f.write(data)


def _key(path: str) -> ec.EllipticCurvePrivateKey:
  key = ec.generate_private_key(ec.SECP256R1())
  _write(path, key.private_bytes(serialization.Encoding.PEM,
                                 serialization.PrivateFormat.PKCS8,
                                 serialization.NoEncryption()), private=True)
  return key


def _certificate(subject: str, key, issuer: x509.Name, signer, days: int, names=None,
                 ca: bool = False) -> x509.Certificate:
  now = datetime.datetime.now(datetime.timezone.utc)
  builder = (x509.CertificateBuilder()
             .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
             .issuer_name(issuer).public_key(key.public_key())
             .serial_number(x509.random_serial_number())
             .not_valid_before(now - datetime.timedelta(minutes=5))
             .not_valid_after(now + datetime.timedelta(days=days))
             .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None),
                            critical=True))
  if ca:
    builder = builder.add_extension(x509.KeyUsage(
        digital_signature=True, key_cert_sign=True, crl_sign=True, content_commitment=False,
        key_encipherment=False, data_encipherment=False, key_agreement=False,
        encipher_only=False, decipher_only=False), critical=True)
  else:
    builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    builder = builder.add_extension(x509.ExtendedKeyUsage(
        [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
  return builder.sign(signer, hashes.SHA256())


def make(directory: str, hosts: list[str], islands: int, days: int = 30) -> dict[str, tuple]:
  """Writes the job's CA and certificates into ``directory``; returns {role: (cert, key)}."""
  os.makedirs(directory, exist_ok=True)
  ca_key = _key(os.path.join(directory, "ca.key"))
  ca = _certificate("fedjax_lm job CA", ca_key, x509.Name(
      [x509.NameAttribute(NameOID.COMMON_NAME, "fedjax_lm job CA")]), ca_key, days, ca=True)
  _write(os.path.join(directory, "ca.pem"), ca.public_bytes(serialization.Encoding.PEM))
  roles = {"syncer": _names(hosts),
           **{f"island{k}": [x509.DNSName(f"island{k}")] for k in range(islands)}}
  out = {}
  for role, names in roles.items():
    cn = f"island-{role[6:]}" if role.startswith("island") else "syncer"
    key = _key(os.path.join(directory, f"{role}.key"))
    cert = _certificate(cn, key, ca.subject, ca_key, days, names)
    _write(os.path.join(directory, f"{role}.pem"), cert.public_bytes(serialization.Encoding.PEM))
    out[role] = (os.path.join(directory, f"{role}.pem"), os.path.join(directory, f"{role}.key"))
  return out


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
  parser.add_argument("directory")
  parser.add_argument("--hosts", default="", help="the syncer's IPs or DNS names, comma separated")
  parser.add_argument("--islands", type=int, default=2)
  parser.add_argument("--days", type=int, default=30)
  args = parser.parse_args(argv)
  try:
    make(args.directory, [h for h in args.hosts.split(",") if h], args.islands, args.days)
  except OSError as e:
    print(f"error: cannot make the job's certificates in {args.directory}: {e}", file=sys.stderr)
    return 1
  print(f"wrote ca.pem, syncer.pem/key and island0..{args.islands - 1}.pem/key to "
        f"{args.directory}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
