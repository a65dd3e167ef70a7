"""`dg scaffold defs normals_pipeline.SurfaceNormalsComponent <name>`: a `defs.yaml` with every attribute,
its default and its description as a comment; the key as `"{{ env.CLIPDROP_API_KEY }}"`."""

from __future__ import annotations

import json
import re
import textwrap
from typing import Any

import dagster as dg
import yaml

# No defaults: placeholders that resolve to nothing until set, so `dg check yaml` passes and `dg check defs`
# says which attribute to fill in.
PLACEHOLDERS = {"dataset": "{{ env.NORMALS_DATASET }}", "output": "{{ env.NORMALS_OUTPUT }}"}
EDIT_ME = "EDIT: write the folder (relative to the project root) or s3:// URI here, or set the variable."


def _yaml_scalar(value: Any) -> str:
    if isinstance(value, dg.EnvVar):
        return json.dumps(f"{{{{ env.{value.env_var_name} }}}}")
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, dict | list):
        return json.dumps(value)  # a JSON object or array is a YAML flow mapping or sequence
    return json.dumps(str(value))  # a JSON string is a YAML double-quoted scalar


def _comment(text: str) -> list[str]:
    return textwrap.wrap(text, width=100, initial_indent="  # ", subsequent_indent="  # ")


def instance_prefix(name: str) -> str:
    """The instance's folder name as a key prefix (letters, digits and '_')."""
    return re.sub(r"[^A-Za-z0-9_]", "_", name) or "normals"


def defs_yaml(type_name: str, instance_name: str) -> str:
    from .component import SurfaceNormalsComponent

    described = SurfaceNormalsComponent.model().model_fields  # the YAML schema: descriptions of its fields
    lines = [f"type: {type_name}", "", "attributes:"]
    for name, field in SurfaceNormalsComponent.model_fields.items():
        description = described[name].description or ""
        if name in PLACEHOLDERS:
            lines += _comment(f"{description} {EDIT_ME}")
            value = _yaml_scalar(PLACEHOLDERS[name])
        elif name == "key_prefix":
            lines += _comment(f"{description} Scaffolded as the instance's name.")
            value = _yaml_scalar(instance_prefix(instance_name))
        else:
            if name == "api_key":
                description = "The key, as a reference to the environment variable that holds it (never the key)."
            lines += _comment(description)
            value = _yaml_scalar(field.get_default(call_default_factory=True))
        lines.append(f"  {name}: {value}")
    values = "\n".join(line for line in lines if not line.lstrip().startswith("#"))
    used = sorted(set(re.findall(r"\{\{\s*env\.(\w+)\s*\}\}", values)))
    lines += [
        "",
        "# The environment variables this file reads (`dg list env`, `dg check yaml --validate-requirements`):",
        "# once dataset and output are written in, remove NORMALS_DATASET and NORMALS_OUTPUT.",
        "requirements:",
        "  env:",
        *(f"    - {name}" for name in used),
    ]
    return "\n".join(lines) + "\n"


class SurfaceNormalsScaffolder(dg.Scaffolder):
    def scaffold(self, request: dg.ScaffoldRequest) -> None:
        if request.scaffold_format != "yaml":
            dg.scaffold_component(request)  # component.py: `@dg.component_instance def load(...)`
            return
        if request.append:  # another document in an existing defs.yaml: its own key prefix
            existing = [doc for doc in yaml.safe_load_all(request.target_path.read_text(encoding="utf-8")) if doc]
            instance = f"{request.target_path.parent.name}_{len(existing) + 1}"
            with open(request.target_path, "a", encoding="utf-8") as file:
                file.write("---\n" + defs_yaml(request.type_name, instance))
        else:
            text = defs_yaml(request.type_name, request.target_path.name)
            (request.target_path / "defs.yaml").write_text(text, encoding="utf-8")
