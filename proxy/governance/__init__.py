"""Governance over decision logs: ``inventory``, ``unused``, ``suggest`` and ``replay``.

Pure modules (no I/O, table-tested in ``tests/unit/test_governance.py``):

- ``records``: the decision-log contract (fields, what each command needs) and the
  values read from logs;
- ``sql``: every SQL statement, as text (the one place for SQL);
- ``judge``: a logged request judged again by ``proxy.decide.decide``, the live
  proxy's own decision function;
- ``inventory``, ``unused``, ``suggest``, ``replay``: each command's logic;
- ``report``: tables as text, CSV and JSON.

The shell: ``engine`` (DuckDB reads the log files and runs the SQL) and ``commands``
(the ``spiffe-pep`` subcommands).
"""
