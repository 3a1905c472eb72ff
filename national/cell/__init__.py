"""The cell's side of the national aggregator (docs/operations.md, "National snapshots").

Every interval the cell reads its store in one consistent transaction (`snapshots`), signs the
result and keeps it in its outbox with the next sequence number (`outbox`), then delivers what
the aggregator has not taken yet, oldest first (`pusher`). Keys: `keys`.
"""
