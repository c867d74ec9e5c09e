"""The one megatron-core release keel is written for, and the check every user of its internals makes.

keel's CPU redirects, its MoE layer, its optimizer patches and its checkpoint plumbing all read
megatron-core's private names, which change between releases. Each of those places calls `require`
before touching them, so another release stops with one line saying what to install instead of failing
somewhere inside megatron."""

PINNED = "0.19.2"


def installed() -> str:
    """megatron-core's release, without the `+<git sha>` it appends when installed inside a git checkout."""
    import megatron.core

    return megatron.core.__version__.split("+")[0]


def require(user: str, what: str, error: type[Exception]) -> None:
    """Raise `error` in one line when the installed release is not `PINNED`; `user` (a module name) uses
    megatron-core's `what`."""
    if (found := installed()) != PINNED:
        raise error(f"{user} uses megatron-core {PINNED}'s {what}, and megatron-core {found} is installed; "
                    f"install megatron-core=={PINNED}")
