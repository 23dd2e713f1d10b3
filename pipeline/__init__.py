"""Plans, coordinates and the CLI: imports workers and manifests; nothing below imports it."""


def mergefleet_version() -> str:
    """The installed package's version ("0+unknown" from a bare checkout)."""
    from importlib import metadata

    try:
        return metadata.version("mergefleet")
    except metadata.PackageNotFoundError:
        return "0+unknown"
