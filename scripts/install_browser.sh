#!/usr/bin/env bash
# Debian's Chromium for the MLflow UI test (tests/test_ui.py drives it with Playwright; nothing downloads a
# browser). Needs apt and root (or password-less sudo); without them the test skips and says why.
set -uo pipefail
if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then exit 0; fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "install_browser: no apt-get here; install Chromium yourself to run the UI test (it skips without it)"; exit 0
fi
SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo -n"
export DEBIAN_FRONTEND=noninteractive
if $SUDO apt-get install -y -q chromium >/dev/null 2>&1 || { $SUDO apt-get update -q >/dev/null 2>&1 && $SUDO apt-get install -y -q chromium >/dev/null 2>&1; }; then
  echo "install_browser: $(chromium --version 2>/dev/null)"
else
  echo "install_browser: apt-get install chromium failed; the UI test will skip"
fi
exit 0
