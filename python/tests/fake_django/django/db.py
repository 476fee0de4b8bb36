from django import record


def close_old_connections() -> None:
    record("close_old_connections")


class _Connections:
    def close_all(self) -> None:
        record("close_all")


connections = _Connections()
