#!/bin/sh
# The browser test drives Debian's chromium (never a browser downloaded by a test tool).
# Installs it when missing and we are root; otherwise says how, and the test skips.
if [ -x /usr/bin/chromium ]; then exit 0; fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
  echo "installing Debian chromium for the browser test ..."
  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium >/dev/null) \
    || echo "warning: could not install chromium; the browser test will be skipped"
else
  echo "note: /usr/bin/chromium is missing; run 'sudo apt-get install chromium' to enable the browser test"
fi
exit 0
