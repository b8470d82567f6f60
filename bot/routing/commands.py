"""Parse what a user typed before it is scored: ``/name`` commands and follow-up markers.

``/name text`` forces a route, ``/help`` lists them, an unknown ``/foo`` falls back. A follow-up
such as "and this one? ..." may stay with the previous adapter (see ``Router.route``).
"""

from __future__ import annotations

import re

from bot.manifests.spec import NAME_PATTERN

HELP = "help"

# "/name rest": the name must be followed by whitespace or the end, so "/r/python rocks" is text.
_COMMAND = re.compile(rf"^\s*/({NAME_PATTERN})(?:\s+|$)(.*)$", re.S)
_DEICTIC = r"(?:this|that|these|those)(?:\s+ones?)?(?![\w'])"
_FOLLOW_UP = re.compile(
    rf"""^\s*(?:
        (?:(?:and|also|now|so|ok(?:ay)?),?\s+)?(?:what|how)\s+about(?:\s+{_DEICTIC})?
      | (?:and|also)\s+{_DEICTIC}
      | (?:same|again)\s+(?:for|with)(?:\s+{_DEICTIC})?
      | (?:and|also|next|another(?:\s+one)?|one\s+more)(?=\s*[:?!,.\-–—])
    )\s*[:?!,.\-–—]*\s*""",
    re.I | re.X,
)


def parse_command(text: str) -> tuple[str, str] | None:
    """``(name, rest)`` when ``text`` starts with ``/name``, else None."""
    match = _COMMAND.match(text)
    return (match.group(1), match.group(2)) if match else None


def split_follow_up(text: str) -> tuple[str, str]:
    """Split a follow-up marker ("and this one?", "what about:") from the rest of the turn.

    Returns ``("", text)`` when the turn does not start with a marker.
    """
    match = _FOLLOW_UP.match(text)
    if not match or not match.group(0).strip():
        return "", text
    return match.group(0).strip(), text[match.end():]


def scoring_text(text: str) -> str:
    """What gets embedded: the turn without its follow-up marker (unless nothing else is left)."""
    rest = split_follow_up(text)[1]
    return rest if rest.strip() else text


def help_lines(names: list[str], n_examples: dict[str, int], describe: dict[str, str]) -> str:
    """The ``/help`` text: one line per adapter (its description, else what it is), then /help."""
    lines = ["Commands (otherwise I pick an adapter for you):"]
    for name in names:
        default = (f"{n_examples[name]} example turns" if name in n_examples
                   else "used when nothing else fits")
        lines.append(f"  /{name} <text> - {describe.get(name, default)}")
    lines.append(f"  /{HELP} - this list")
    return "\n".join(lines)
