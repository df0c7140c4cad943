#!/usr/bin/env bash
# Install (or remove) the edge-infer service on a device, or into an image tree with --root.
#
# usage: systemd/install.sh [--root DIR] [--bin PATH] [--config FILE] [--model PKG_DIR]
#                           [--public-key PEM] [--device-id ID] [--enable]
#        systemd/install.sh [--root DIR] [--bin PATH] --uninstall [--purge] [--forget | --keep-retained]
#
# Puts in place (all paths under --root, default /):
#   /etc/systemd/system/edge-infer.service         the hardened unit (ExecStart rewritten with --bin)
#   /usr/lib/sysusers.d/edge-infer.conf            the system user; applied with systemd-sysusers
#   /usr/lib/tmpfiles.d/edge-infer.conf            /etc/edge-infer, /var/lib/edge-infer{,/models}
#   /usr/share/doc/edge-infer/                     deploy.md and the drop-in examples
#   /etc/edge-infer/config.yaml                    --config, or a starter config; NEVER overwritten
#   /etc/edge-infer/trusted-keys/<name>.pub        --public-key; never overwritten
#   /var/lib/edge-infer/models/<name>-<version>/   --model (a package directory), plus models/current
#
# Safe to run twice: files it owns are replaced with the same content, an existing config, key, model
# or `current` link is left alone. --uninstall removes the unit, snippets and docs, keeps config and
# state (outbox, models, trust.json) unless --purge; the system user is kept (sysusers.d convention).
# Uninstalling from / also runs `edge-infer forget` once the service is stopped, so the device's Home
# Assistant entities, zone counts, snapshots and status leave the broker (--keep-retained skips it; with
# --root it runs only when asked with --forget). A broker it cannot reach is a warning, not a failure.
# With --root other than /, nothing is started and ownership is left to the image build.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
repo="$(cd "$here/.." && pwd)"
root="/"
bin="/usr/local/bin/edge-infer"
config=""
model=""
public_key=""
device_id=""
enable=0
uninstall=0
purge=0
forget=""

die() { echo "install.sh: $*" >&2; exit 2; }
say() { echo "install.sh: $*"; }

while [[ $# -gt 0 ]]; do
    case "$1" in
        --root) root="${2:?--root needs a directory}"; shift 2 ;;
        --bin) bin="${2:?--bin needs a path}"; shift 2 ;;
        --config) config="${2:?--config needs a file}"; shift 2 ;;
        --model) model="${2:?--model needs a package directory}"; shift 2 ;;
        --public-key) public_key="${2:?--public-key needs a PEM file}"; shift 2 ;;
        --device-id) device_id="${2:?--device-id needs a value}"; shift 2 ;;
        --enable) enable=1; shift ;;
        --uninstall) uninstall=1; shift ;;
        --purge) purge=1; shift ;;
        --forget) forget=1; shift ;;
        --keep-retained) forget=0; shift ;;
        -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
        *) die "unknown argument '$1' (see --help)" ;;
    esac
done

[[ -d "$root" ]] || die "--root: '$root' is not a directory"
root="$(cd "$root" && pwd)"
prefix="${root%/}"  # "" for /, so "$prefix/etc" is /etc
live=0
[[ "$root" == "/" ]] && live=1
[[ "$bin" == /* ]] || die "--bin: '$bin' must be an absolute path"
[[ "$bin" =~ ^[A-Za-z0-9_./+-]+$ ]] || die "--bin: '$bin' has characters not allowed in a unit path"

unit_path="$prefix/etc/systemd/system/edge-infer.service"
sysusers_path="$prefix/usr/lib/sysusers.d/edge-infer.conf"
tmpfiles_path="$prefix/usr/lib/tmpfiles.d/edge-infer.conf"
doc_dir="$prefix/usr/share/doc/edge-infer"
etc_dir="$prefix/etc/edge-infer"
state_dir="$prefix/var/lib/edge-infer"
models_dir="$state_dir/models"

if [[ $uninstall -eq 1 ]]; then
    if [[ $live -eq 1 ]] && command -v systemctl >/dev/null && [[ -d /run/systemd/system ]]; then
        systemctl disable --now edge-infer.service 2>/dev/null || true
    elif [[ -e "$prefix/etc/systemd/system/multi-user.target.wants/edge-infer.service" ]]; then
        rm -f "$prefix/etc/systemd/system/multi-user.target.wants/edge-infer.service"
    fi
    [[ -z "$forget" ]] && forget=$live
    if [[ $forget -eq 1 && -f "$etc_dir/config.yaml" ]]; then
        # After the stop: a running daemon would announce itself again on its next connection.
        if [[ ! -x "$bin" ]]; then
            say "warning: $bin is not there; the device's retained MQTT topics stay (run: edge-infer forget --config $etc_dir/config.yaml)"
        elif ! "$bin" forget --config "$etc_dir/config.yaml"; then
            say "warning: the device's retained MQTT topics stay; run '$bin forget --config $etc_dir/config.yaml' when the broker is reachable"
        fi
    fi
    rm -f "$unit_path" "$sysusers_path" "$tmpfiles_path"
    rm -rf "$doc_dir"
    if [[ $purge -eq 1 ]]; then
        rm -rf "$etc_dir" "$state_dir"
        say "removed the service, its config and its state from $root"
    else
        say "removed the service from $root; kept $etc_dir and $state_dir (use --purge to delete them)"
    fi
    if [[ $live -eq 1 ]] && command -v systemctl >/dev/null && [[ -d /run/systemd/system ]]; then
        systemctl daemon-reload
    fi
    exit 0
fi

# Check every input before writing anything, so a bad argument leaves the target untouched.
[[ -z "$config" || -f "$config" ]] || die "--config: '$config' is not a file"
[[ -z "$public_key" || -f "$public_key" ]] || die "--public-key: '$public_key' is not a file"
if [[ -n "$public_key" ]] && ! grep -q "BEGIN PUBLIC KEY" "$public_key"; then
    die "--public-key: '$public_key' is not a PEM public key (edge-infer keygen writes one)"
fi
if [[ -n "$device_id" ]] && ! [[ "$device_id" =~ ^[A-Za-z0-9][A-Za-z0-9._:-]{0,127}$ ]]; then
    die "--device-id: '$device_id' must be 1-128 of A-Z a-z 0-9 . _ : - (it is an MQTT topic level)"
fi
model_dest=""
if [[ -n "$model" ]]; then
    [[ -f "$model/manifest.json" ]] || die "--model: '$model' has no manifest.json (not a package directory)"
    # <name>-<version> from the manifest, restricted to a safe directory name.
    model_id="$(python3 -c '
import json, re, sys
m = json.load(open(sys.argv[1], encoding="utf-8"))
print(re.sub(r"[^A-Za-z0-9._+-]", "_", str(m["name"]) + "-" + str(m["version"])))
' "$model/manifest.json")" || die "--model: '$model/manifest.json' is not a readable manifest"
    [[ -n "$model_id" && "$model_id" != .* ]] || die "--model: manifest name/version give no usable directory name"
    model_dest="$models_dir/$model_id"
fi

install -d -m 0755 "$prefix/etc/systemd/system" "$prefix/usr/lib/sysusers.d" "$prefix/usr/lib/tmpfiles.d" \
    "$doc_dir" "$doc_dir/drop-ins"
tmp_unit="$(mktemp)"
trap 'rm -f "$tmp_unit"' EXIT
sed -E "s|^ExecStart=[^ ]+|ExecStart=$bin|" "$here/edge-infer.service" >"$tmp_unit"
install -m 0644 "$tmp_unit" "$unit_path"
install -m 0644 "$here/edge-infer.sysusers.conf" "$sysusers_path"
install -m 0644 "$here/edge-infer.tmpfiles.conf" "$tmpfiles_path"
install -m 0644 "$here"/drop-ins/*.conf "$doc_dir/drop-ins/"
for extra in mosquitto-acl.example mosquitto-device.conf.example; do
    [[ -f "$here/$extra" ]] && install -m 0644 "$here/$extra" "$doc_dir/$extra"
done
[[ -f "$repo/docs/deploy.md" ]] && install -m 0644 "$repo/docs/deploy.md" "$doc_dir/deploy.md"
say "unit, sysusers.d and tmpfiles.d snippets in place under $root"

# The user and directories: systemd-sysusers/-tmpfiles understand --root, so an image gets the same.
if command -v systemd-sysusers >/dev/null; then
    if [[ $live -eq 1 ]]; then systemd-sysusers "$sysusers_path"; else systemd-sysusers --root="$root" "$sysusers_path"; fi
fi
if [[ $live -eq 1 ]] && command -v systemd-tmpfiles >/dev/null; then
    systemd-tmpfiles --create "$tmpfiles_path"
else
    # Offline (image tree): the user may not resolve on this host, so create the layout without owners.
    install -d -m 0750 "$etc_dir"
    install -d -m 0700 "$state_dir"
    install -d -m 0750 "$models_dir"
fi

owner_group() {  # chown only on the live system; an image build sets owners itself.
    if [[ $live -eq 1 && $(id -u) -eq 0 ]]; then chown "$@"; fi
}

if [[ -n "$public_key" ]]; then
    install -d -m 0750 "$etc_dir/trusted-keys"
    key_dest="$etc_dir/trusted-keys/$(basename "$public_key")"
    if [[ -e "$key_dest" ]]; then
        cmp -s "$public_key" "$key_dest" || say "kept existing $key_dest (differs from $public_key; not replaced)"
    else
        install -m 0640 "$public_key" "$key_dest"
        owner_group root:edge-infer "$etc_dir/trusted-keys" "$key_dest"
        say "trusted key $key_dest"
    fi
fi

config_dest="$etc_dir/config.yaml"
if [[ -e "$config_dest" ]]; then
    say "kept existing $config_dest"
else
    tmp_config="$(mktemp "$etc_dir/.config.yaml.XXXXXX")"
    if [[ -n "$config" ]]; then
        cat "$config" >"$tmp_config"
    else
        keys_line="trusted_keys: []   # add /etc/edge-infer/trusted-keys/*.pub to refuse unsigned packages"
        [[ -n "$public_key" ]] && keys_line="trusted_keys: [/etc/edge-infer/trusted-keys/$(basename "$public_key")]"
        cat >"$tmp_config" <<EOF
# edge-infer config (docs/deploy.md). Written once by install.sh; never overwritten by it.
device_id: ${device_id:-$(hostname -s 2>/dev/null | tr -c 'A-Za-z0-9._:\n-' '_' || echo edge-device)}
profile: auto
model: /var/lib/edge-infer/models/current
source: {type: video, uri: /dev/video0, fps: 5}
mqtt:
  host: 127.0.0.1
  port: 1883
  qos: 1
  topic_prefix: edge
  # TLS with CA pinning / mutual TLS and a password file: see docs/deploy.md "MQTT security".
outbox: {path: /var/lib/edge-infer/outbox.db, max_bytes: 67108864}
$keys_line
# TimeoutStopSec=20 in edge-infer.service: draining the outbox must finish well before SIGKILL.
flush_timeout_s: 15
EOF
    fi
    chmod 0640 "$tmp_config"
    mv -f "$tmp_config" "$config_dest"
    owner_group root:edge-infer "$config_dest"
    say "config $config_dest (edit device_id, source and mqtt)"
fi

if [[ -n "$model_dest" ]]; then
    if [[ -e "$model_dest" ]]; then
        say "kept existing model $model_dest"
    else
        staging="$(mktemp -d "$models_dir/.staging.XXXXXX")"
        cp -R "$model/." "$staging/"
        chmod -R u=rwX,g=rX,o= "$staging"
        mv "$staging" "$model_dest"
        owner_group -R edge-infer:edge-infer "$model_dest"
        say "model $model_dest"
    fi
    if [[ -e "$models_dir/current" || -L "$models_dir/current" ]]; then
        say "kept existing $models_dir/current -> $(readlink "$models_dir/current" || echo '?')"
    else
        ln -s "$(basename "$model_dest")" "$models_dir/current"
        say "$models_dir/current -> $(basename "$model_dest")"
    fi
fi

if [[ $live -eq 1 ]] && command -v systemctl >/dev/null && [[ -d /run/systemd/system ]]; then
    systemctl daemon-reload
    if [[ $enable -eq 1 ]]; then
        systemctl enable --now edge-infer.service
        say "enabled and started edge-infer.service"
    fi
elif [[ $enable -eq 1 ]]; then
    systemctl --root="$root" enable edge-infer.service
    say "enabled edge-infer.service in $root"
fi
say "done. Check with: edge-infer check-config /etc/edge-infer/config.yaml"
