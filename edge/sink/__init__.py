"""`edge-sink`: a fleet's predictions into PostgreSQL or SQLite with nothing lost (docs/contracts.md).

An MQTT 5 shared subscription (`$share/{group}/...`) lets several sinks split one broker's load; a
persistent session keeps what arrives while a sink restarts; messages are acknowledged only after the
database transaction holding them commits, so a sink killed mid-batch loses nothing and the primary key
(device_id, boot_id, seq) absorbs the redelivered duplicates.
"""
