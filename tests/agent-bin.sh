# Sourced by tests/demo.sh and bench/*.sh: agent_bin builds the release binary
# and prints its path as cargo reports it (so CARGO_TARGET_DIR and the
# explicit target in .cargo/config.toml are honoured).
agent_bin() {
  cargo build --release --quiet --message-format=json | python3 -c '
import json, sys
exe = ""
for line in sys.stdin:
    m = json.loads(line)
    if m.get("reason") == "compiler-artifact" and m["target"]["name"] == "soci-agent" and m.get("executable"):
        exe = m["executable"]
if not exe:
    sys.exit("cargo reported no soci-agent executable")
print(exe)'
}
