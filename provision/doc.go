// Package provision creates guest disks on a host from an image generation in
// the host's store (package store), and lists the disks libvirt knows of for
// the store's GC (Virsh.Disks).
//
// A guest disk is one of:
//
//   - a full copy into a file (sparse raw, written to a temp file and linked
//     into place), a block device or LVM volume (created with lvcreate when
//     missing), or a libvirt pool volume (virsh vol-create-as, vol-path,
//     pool-refresh). Only the image's allocated, non-zero data is written; on
//     a block device every other byte up to the device's end is zeroed with
//     BLKZEROOUT, so no stale data reaches the guest.
//   - a qcow2 overlay whose backing file is the immutable generation path
//     (never the store's current symlink), made by qemu-img create.
//
// Given an image name (Request.Name) instead of a path, Provision resolves
// the store's current generation under a store.Use, which keeps gc from
// removing it until the disk that uses it is in place.
//
// An existing disk is never touched. Force recreates it, but is refused while
// QEMU holds a lock on it or a running libvirt domain lists it among its disks.
//
// External programs (virsh, lvcreate, lvremove, qemu-img) run through a
// Runner, so tests can substitute them.
//
// Limits: images are read with go-qcow2reader (any qcow2 it reads, raw too);
// the guest size must be at least the image's virtual size and the disk is
// not grown inside (the guest's nixvm-resize does that at first boot).
package provision
