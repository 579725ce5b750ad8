"""YAML read strictly: a key given twice in one mapping is an error, not "the last one wins".

PyYAML's safe loader keeps the last of two equal keys without a word, so a config with two `stage1:` blocks or
`lr` twice trains with whichever came last. `load` raises `DuplicateKeyError` (a `yaml.YAMLError`, so callers
that already turn YAML errors into messages keep working) naming the key and both lines.
"""

from __future__ import annotations

import yaml


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A mapping names one key twice."""


class _StrictLoader(yaml.SafeLoader):
    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *base`: merged keys may be overridden
                    continue
                key = self.construct_object(key_node, deep=True)
                try:
                    first = seen.setdefault(key, key_node)
                except TypeError:  # an unhashable key: PyYAML's own error follows
                    continue
                if first is not key_node:
                    raise DuplicateKeyError(
                        None,
                        None,
                        f"key {key!r} is given twice (line {first.start_mark.line + 1} and line "
                        f"{key_node.start_mark.line + 1}): keep one",
                        key_node.start_mark,
                    )
        return super().construct_mapping(node, deep=deep)


def load(text: str):
    """The document in `text`, as yaml.safe_load reads it, refusing duplicate keys."""
    return yaml.load(text, Loader=_StrictLoader)
