// Package nix holds the NixOS module that nixvm-image adds to every
// configuration it builds (guest.nix), embedded in the binary.
package nix

import _ "embed"

// GuestModule is guest.nix: root by label, the boot loader for the layout,
// virtio modules in the initrd, and the first-boot nixvm-resize unit.
//
//go:embed guest.nix
var GuestModule []byte
