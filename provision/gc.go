package provision

import (
	"context"
	"encoding/xml"
	"fmt"

	"github.com/nixvm-image/nixvm-image/store"
)

// Disks returns a function that lists the disks libvirt knows of, for
// store.GCOptions.Disks: the volumes of pools and, with domains, every disk
// of every domain.
//
// A domain disk carries its driver type (raw, qcow2) from the domain's
// XML, so GC never reads a raw disk's first sector as a qcow2 header.
// Pool volumes have no format here: GC reads them, and follows only a
// backing file that is a regular file inside the store.
func (v *Virsh) Disks(pools []string, domains bool) func(ctx context.Context) ([]store.Disk, error) {
	return func(ctx context.Context) ([]store.Disk, error) {
		var disks []store.Disk
		for _, pool := range pools {
			paths, err := v.PoolPaths(ctx, pool)
			if err != nil {
				return nil, fmt.Errorf("provision: listing pool %s: %w", pool, err)
			}
			for _, p := range paths {
				disks = append(disks, store.Disk{Path: p})
			}
		}
		if !domains {
			return disks, nil
		}
		doms, err := v.Domains(ctx, true)
		if err != nil {
			return nil, fmt.Errorf("provision: listing domains: %w", err)
		}
		for _, d := range doms {
			paths, err := v.domainDisks(ctx, d)
			if err != nil {
				return nil, fmt.Errorf("provision: listing disks of domain %s: %w", d, err)
			}
			formats, err := v.domainFormats(ctx, d)
			if err != nil {
				return nil, fmt.Errorf("provision: reading the disk formats of domain %s: %w", d, err)
			}
			for _, p := range paths {
				disks = append(disks, store.Disk{Path: p.Source, Format: formats[p.Target]})
			}
		}
		return disks, nil
	}
}

// domainFormats maps each disk target (vda) of a domain to its driver type
// (raw, qcow2), from its XML.
func (v *Virsh) domainFormats(ctx context.Context, dom string) (map[string]string, error) {
	out, err := v.do(ctx, "dumpxml", dom)
	if err != nil {
		return nil, err
	}
	return parseDiskFormats(out)
}

func parseDiskFormats(domXML string) (map[string]string, error) {
	var x struct {
		Disks []struct {
			Driver struct {
				Type string `xml:"type,attr"`
			} `xml:"driver"`
			Target struct {
				Dev string `xml:"dev,attr"`
			} `xml:"target"`
		} `xml:"devices>disk"`
	}
	if err := xml.Unmarshal([]byte(domXML), &x); err != nil {
		return nil, err
	}
	m := map[string]string{}
	for _, d := range x.Disks {
		m[d.Target.Dev] = d.Driver.Type
	}
	return m, nil
}
