"""Image references (``registry:5000/team/app:1.0@sha256:...``) checked against Docker's grammar.

The grammar is distribution/reference's (``reference/regexp.go``): lowercase path components joined by
``.``, ``_``, ``__`` or dashes, an optional registry host[:port] as the first component, a tag
``[\\w][\\w.-]{0,127}`` and a digest. A store or an archive that accepted anything else would write
names that docker, podman and skopeo then refuse.
"""
from __future__ import annotations

import re

_ALNUM = r"[a-z0-9]+"
_SEP = r"(?:[._]|__|[-]+)"
_PATH_COMPONENT = rf"{_ALNUM}(?:{_SEP}{_ALNUM})*"
_DOMAIN_COMPONENT = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
# a first component is a registry only if it looks like one (a dot, a port or localhost), as
# docker's splitDockerDomain decides; otherwise it is a repository component and must be lowercase
_DOMAIN = (rf"(?:{_DOMAIN_COMPONENT}(?:\.{_DOMAIN_COMPONENT})+(?::[0-9]+)?|{_DOMAIN_COMPONENT}:[0-9]+"
           r"|localhost|\[[a-fA-F0-9:]+\](?::[0-9]+)?)")
_TAG = r"[\w][\w.-]{0,127}"
_DIGEST = r"[a-z0-9]+(?:[.+_-][a-z0-9]+)*:[0-9a-fA-F]{32,}"
_REFERENCE = re.compile(rf"^(?P<name>(?:{_DOMAIN}/)?{_PATH_COMPONENT}(?:/{_PATH_COMPONENT})*)"
                        rf"(?::(?P<tag>{_TAG}))?(?:@(?P<digest>{_DIGEST}))?$", re.ASCII)
_IMAGE_ID = re.compile(r"^sha256:[a-f0-9]{64}$")
NAME_MAX = 255


class InvalidReference(ValueError):
    """An image name that Docker's reference grammar refuses."""


def check_reference(ref: str, *, allow_id: bool = True) -> str:
    """``ref`` unchanged if it is a valid image reference (or, with ``allow_id``, a bare image id)."""
    if not isinstance(ref, str):
        raise InvalidReference(f"invalid image name {ref!r}: not a string")
    if allow_id and _IMAGE_ID.match(ref):
        return ref
    m = _REFERENCE.match(ref)
    if m is None:
        raise InvalidReference(f"invalid image name {ref!r}: {_why(ref)}")
    if len(m.group("name")) > NAME_MAX:
        raise InvalidReference(f"invalid image name {ref[:40]!r}...: repository name longer than {NAME_MAX} characters")
    return ref


def _why(ref: str) -> str:
    """The first rule ``ref`` breaks, in words (for the error message)."""
    if not ref:
        return "empty"
    name, at, digest = ref.partition("@")
    if at and not re.fullmatch(_DIGEST, digest, re.ASCII):
        return "a digest is ALGORITHM:HEX with at least 32 hex digits"
    last = name.rpartition("/")[2]
    repo, colon, tag = (name.rpartition(":") if ":" in last else (name, "", ""))
    if colon and not re.fullmatch(_TAG, tag, re.ASCII):
        return "a tag is letters, digits, '_', '.' or '-' (not starting with '.' or '-'), at most 128 characters"
    comps = repo.split("/")
    if len(comps) > 1 and re.fullmatch(_DOMAIN, comps[0], re.ASCII):
        comps = comps[1:]
    for c in comps:
        if not re.fullmatch(_PATH_COMPONENT, c, re.ASCII):
            return (f"repository component {c!r} must be lowercase letters and digits, "
                    "separated by '.', '_', '__' or '-'")
    return "does not follow Docker's [registry/]repository[:tag][@digest] grammar"


def is_reference(ref: str) -> bool:
    try:
        check_reference(ref)
    except InvalidReference:
        return False
    return True
