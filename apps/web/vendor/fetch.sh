#!/usr/bin/env bash
# Re-create apps/web/vendor/ from the npm registry: the few files the in-browser chat mode needs, pinned.
# The output is committed (about 14 MB, mostly onnxruntime's WebAssembly), so neither the tests nor
# `ondevice serve` need npm; run this only to upgrade a package (bump the version here, then commit).
set -euo pipefail
cd "$(dirname "$0")"
ORT=onnxruntime-web@1.30.0
TOKENIZERS=@huggingface/tokenizers@0.2.0
JINJA=@huggingface/jinja@0.5.11
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
(cd "$work" && npm pack --silent "$ORT" "$TOKENIZERS" "$JINJA" >/dev/null)
for tgz in "$work"/*.tgz; do mkdir -p "${tgz%.tgz}" && tar xzf "$tgz" -C "${tgz%.tgz}"; done
rm -rf onnxruntime-web tokenizers jinja
mkdir -p onnxruntime-web tokenizers jinja
# onnxruntime-web: the WebAssembly (CPU) build only, ES modules; the glue .mjs and the .wasm load on demand.
cp "$work"/onnxruntime-web-*/package/dist/{ort.wasm.min.mjs,ort-wasm-simd-threaded.mjs,ort-wasm-simd-threaded.wasm} onnxruntime-web/
cp "$work"/huggingface-tokenizers-*/package/dist/tokenizers.min.mjs "$work"/huggingface-tokenizers-*/package/LICENSE tokenizers/
cp "$work"/huggingface-jinja-*/package/dist/index.js "$work"/huggingface-jinja-*/package/LICENSE jinja/
# The onnxruntime-web tarball carries no LICENSE file; its package.json says MIT (Microsoft's onnxruntime).
cat > onnxruntime-web/LICENSE <<'LIC'
MIT License

Copyright (c) Microsoft Corporation

Permission is hereby granted, free of charge, to any person obtaining a copy
of this software and associated documentation files (the "Software"), to deal
in the Software without restriction, including without limitation the rights
to use, copy, modify, merge, publish, distribute, sublicense, and/or sell
copies of the Software, and to permit persons to whom the Software is
furnished to do so, subject to the following conditions:

The above copyright notice and this permission notice shall be included in all
copies or substantial portions of the Software.

THE SOFTWARE IS PROVIDED "AS IS", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR
IMPLIED, INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY,
FITNESS FOR A PARTICULAR PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE
AUTHORS OR COPYRIGHT HOLDERS BE LIABLE FOR ANY CLAIM, DAMAGES OR OTHER
LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR OTHERWISE, ARISING FROM,
OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER DEALINGS IN THE
SOFTWARE.
LIC
# What is here, exactly: the test suite checks these hashes (tests/test_apps.py).
python3 - "$ORT" "$TOKENIZERS" "$JINJA" <<'PY'
import hashlib, json, pathlib, sys
files = sorted(p for p in pathlib.Path(".").rglob("*") if p.is_file() and p.name not in ("fetch.sh", "VENDORED.json"))
record = {"packages": sys.argv[1:], "files": {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}}
pathlib.Path("VENDORED.json").write_text(json.dumps(record, indent=2) + "\n")
PY
du -sh .
