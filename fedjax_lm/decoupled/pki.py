"""A job's certificate authority for the decoupled channel's mutual TLS, in one command.

    python -m fedjax_lm.decoupled.pki DIR --hosts 10.0.0.5,syncer.example.org --islands 4

writes, with the ``openssl`` command line (no private key leaves DIR):

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
import ipaddress
import os
import subprocess
import sys


def _openssl(directory: str, *args: str) -> None:
  subprocess.run(["openssl", *args], cwd=directory, check=True, capture_output=True)


def _san(hosts: list[str]) -> str:
  names = []
  for h in ["127.0.0.1", "localhost", *hosts]:
    try:
      ipaddress.ip_address(h)
      names.append(f"IP:{h}")
    except ValueError:
      names.append(f"DNS:{h}")
  return ",".join(dict.fromkeys(names))


def make(directory: str, hosts: list[str], islands: int, days: int = 30) -> dict[str, tuple]:
  """Writes the job's CA and certificates into ``directory``; returns {role: (cert, key)}."""
  os.makedirs(directory, exist_ok=True)
  _openssl(directory, "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", str(days),
           "-subj", "/CN=fedjax_lm job CA", "-keyout", "ca.key", "-out", "ca.pem")
  roles = {"syncer": _san(hosts), **{f"island{k}": f"DNS:island{k}" for k in range(islands)}}
  out = {}
  for role, san in roles.items():
    cn = f"island-{role[6:]}" if role.startswith("island") else "syncer"
    _openssl(directory, "req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={cn}",
             "-keyout", f"{role}.key", "-out", f"{role}.csr")
    with open(os.path.join(directory, f"{role}.ext"), "w", encoding="utf-8") as f:
      f.write(f"subjectAltName={san}\n")
    _openssl(directory, "x509", "-req", "-in", f"{role}.csr", "-CA", "ca.pem", "-CAkey",
             "ca.key", "-CAcreateserial", "-days", str(days), "-extfile", f"{role}.ext",
             "-out", f"{role}.pem")
    for tmp in (f"{role}.csr", f"{role}.ext"):
      os.remove(os.path.join(directory, tmp))
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
  except (OSError, subprocess.CalledProcessError) as e:
    print(f"error: cannot make the job's certificates in {args.directory}: {e}", file=sys.stderr)
    return 1
  print(f"wrote ca.pem, syncer.pem/key and island0..{args.islands - 1}.pem/key to "
        f"{args.directory}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
