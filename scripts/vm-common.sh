# Shared by scripts/rxe-vm and scripts/rxe-link (sourced, not run): the
# guest kernel (Debian's, with rdma_rxe) cached under WORK, and the modules
# an initramfs loads.

# guest_kernel WORK: fetches and unpacks the kernel package once per
# machine; prints its version.
guest_kernel() {
  local work=$1 pkg
  mkdir -p "$work"
  if [ ! -f "$work/kernel.ok" ]; then
    pkg=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-/ {print $2; exit}')
    (cd "$work" && rm -f linux-image-*.deb && apt-get download "$pkg" >&2 2>/dev/null) || return 1
    rm -rf "$work/kernel"
    dpkg -x "$work"/linux-image-*.deb "$work/kernel" || return 1
    echo "${pkg#linux-image-}" > "$work/kernel.ok"
  fi
  depmod -b "$work/kernel" "$(cat "$work/kernel.ok")"
  cat "$work/kernel.ok"
}

# add_modules WORK KVER ROOT MODULE...: copies (decompressed) modules into
# ROOT/mods and lists them, in order, in ROOT/mods/order.
add_modules() {
  local work=$1 kver=$2 root=$3 m f
  shift 3
  for m in "$@"; do
    f=$(find "$work/kernel/lib/modules/$kver" -name "$m.ko*" | head -n 1)
    [ -n "$f" ] || { echo "module $m is not in the kernel package" >&2; return 1; }
    case "$f" in
      *.xz) xz -dc "$f" > "$root/mods/$m.ko" ;;
      *.zst) zstd -qdc "$f" > "$root/mods/$m.ko" ;;
      *) cp "$f" "$root/mods/$m.ko" ;;
    esac
    echo "$m" >> "$root/mods/order"
  done
}
