#!/usr/bin/env bash
# Installs etcd (Debian's etcd-server) for the membership tests when `etcd` is missing.
# The tests start their own 3-member cluster on free 127.0.0.1 ports; the package's own
# service is kept from starting (policy-rc.d) or stopped and disabled right after install,
# so no etcd is left listening on 2379.
set -euo pipefail

if command -v etcd >/dev/null 2>&1; then
	exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
	echo "etcd not found and apt-get unavailable: install etcd >= 3.4 (etcd-server) yourself;" \
		"the etcd membership tests fail under CI and skip elsewhere without it" >&2
	exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
	if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
		SUDO="sudo -n"
	else
		echo "etcd not found: run 'sudo apt-get install -y etcd-server' (needs root);" \
			"the etcd membership tests fail under CI and skip elsewhere without it" >&2
		exit 0
	fi
fi

created_policy=""
if [ ! -e /usr/sbin/policy-rc.d ]; then  # keep the package's service from starting during install
	printf '#!/bin/sh\nexit 101\n' | $SUDO tee /usr/sbin/policy-rc.d >/dev/null
	$SUDO chmod +x /usr/sbin/policy-rc.d
	created_policy=1
fi
cleanup() { if [ -n "$created_policy" ]; then $SUDO rm -f /usr/sbin/policy-rc.d; fi; }
trap cleanup EXIT

export DEBIAN_FRONTEND=noninteractive
if ! $SUDO apt-get install -y -q --no-install-recommends etcd-server; then
	$SUDO apt-get update -q
	$SUDO apt-get install -y -q --no-install-recommends etcd-server
fi
if command -v systemctl >/dev/null 2>&1 && [ -d /run/systemd/system ]; then
	$SUDO systemctl disable --now etcd >/dev/null 2>&1 || true  # tests run their own cluster
fi
if command -v etcd >/dev/null 2>&1; then
	etcd --version | head -1
else
	echo "etcd-server is installed but etcd is not on PATH (PATH=$PATH)" >&2
fi
