#!/usr/bin/env python3
"""Validates custom resources against their CRDs' openAPIV3Schema, strictly.

  validate_crs.py --crds DIR FILE...       # YAML files, many documents each

Each CRD's schema (per served version) becomes a JSON Schema: objects with
`properties` refuse unknown fields unless `x-kubernetes-preserve-unknown-fields`
(or `additionalProperties`) says otherwise; `x-kubernetes-int-or-string` accepts
an integer or a string; `nullable` adds null. Every document whose
apiVersion/kind matches a CRD is validated; built-in kinds are skipped (they are
kubernetes-validate's), and a custom kind with no CRD here is an error.
CEL rules (`x-kubernetes-validations`) are not evaluated.

Prints one line per resource and `validate_crs: resources=N failed=M`; exits 1
if any failed.
"""
import argparse
import glob
import os
import sys

import jsonschema
import yaml

BUILTIN_GROUPS = {"", "apps", "batch", "policy", "autoscaling", "networking.k8s.io", "rbac.authorization.k8s.io",
                  "storage.k8s.io", "coordination.k8s.io", "scheduling.k8s.io", "discovery.k8s.io"}


def to_json_schema(s):
    """A CRD structural schema node as a strict JSON Schema node."""
    if not isinstance(s, dict):
        return s
    out = {}
    preserve = s.get("x-kubernetes-preserve-unknown-fields", False)
    if s.get("x-kubernetes-int-or-string"):
        out["anyOf"] = [{"type": "integer"}, {"type": "string"}]
    elif "type" in s:
        out["type"] = [s["type"], "null"] if s.get("nullable") else s["type"]
    for k in ("enum", "format", "pattern", "minimum", "maximum", "minLength", "maxLength", "minItems",
              "maxItems", "required", "exclusiveMinimum", "exclusiveMaximum", "default"):
        if k in s:
            out[k] = s[k]
    if out.get("format") not in (None, "date-time", "email", "ipv4", "ipv6", "uri"):
        out.pop("format")
    if "enum" in s and s.get("nullable"):
        out["enum"] = list(s["enum"]) + [None]
    if "properties" in s:
        out["properties"] = {k: to_json_schema(v) for k, v in s["properties"].items()}
    if "items" in s:
        out["items"] = to_json_schema(s["items"])
    if "additionalProperties" in s:
        ap = s["additionalProperties"]
        out["additionalProperties"] = to_json_schema(ap) if isinstance(ap, dict) else ap
    elif s.get("type") == "object" and "properties" in s and not preserve:
        out["additionalProperties"] = False
    for k in ("oneOf", "anyOf", "allOf"):
        if k in s:
            # Structural schemas use these only to add constraints, never types.
            out.setdefault("allOf", []).append({k: [to_json_schema(x) for x in s[k]]})
    return out


def load_crds(directory):
    schemas = {}
    for path in sorted(glob.glob(os.path.join(directory, "*.yaml"))):
        for doc in yaml.safe_load_all(open(path)):
            if not doc or doc.get("kind") != "CustomResourceDefinition":
                continue
            spec = doc["spec"]
            for v in spec["versions"]:
                if not v.get("served"):
                    continue
                schema = to_json_schema(v["schema"]["openAPIV3Schema"])
                # metadata is the apiserver's ObjectMeta, not the CRD's to say.
                schema.setdefault("properties", {})["metadata"] = {"type": "object"}
                schemas[(f"{spec['group']}/{v['name']}", spec["names"]["kind"])] = schema
    return schemas


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--crds", required=True)
    ap.add_argument("files", nargs="+")
    args = ap.parse_args()
    schemas = load_crds(args.crds)
    n = failed = 0
    for path in args.files:
        for doc in yaml.safe_load_all(open(path)):
            if not doc:
                continue
            api, kind = doc.get("apiVersion", ""), doc.get("kind", "")
            group = api.rsplit("/", 1)[0] if "/" in api else ""
            if group in BUILTIN_GROUPS:
                continue
            n += 1
            name = f"{kind}/{doc.get('metadata', {}).get('name', '?')} ({os.path.basename(path)})"
            schema = schemas.get((api, kind))
            if schema is None:
                failed += 1
                print(f"FAIL {name}: no CRD for {api} {kind}")
                continue
            errors = sorted(jsonschema.Draft7Validator(schema).iter_errors(doc), key=lambda e: list(e.path))
            if errors:
                failed += 1
                for e in errors[:5]:
                    print(f"FAIL {name}: {'/'.join(map(str, e.path))}: {e.message}")
            else:
                print(f"ok   {name}")
    print(f"validate_crs: resources={n} failed={failed}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
