#!/usr/bin/env bash
# Debian's Chromium for the web demo's browser test (tests/test_web_demo.py drives /usr/bin/chromium
# through playwright; playwright's own browser download is never used). Does nothing when Chromium is
# there already. It never fails the test command: without Chromium that one test is skipped and says why.
set -u
if [ -x /usr/bin/chromium ]; then
  exit 0
fi
SUDO=""
if [ "$(id -u)" != 0 ]; then
  if command -v sudo >/dev/null && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
  else
    echo "install_test_browser: not root; for the browser test run: sudo apt-get install chromium" >&2
    exit 0
  fi
fi
if ! command -v apt-get >/dev/null; then
  echo "install_test_browser: no apt-get here; install Chromium at /usr/bin/chromium for the browser test" >&2
  exit 0
fi
echo "install_test_browser: installing Debian's chromium (apt-get) for the browser test" >&2
if ! { $SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium >/dev/null; }; then
  echo "install_test_browser: apt-get could not install chromium; the browser test will be skipped" >&2
fi
exit 0
