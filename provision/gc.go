package provision

import (
	"context"
	"fmt"
)

// Disks returns a function that lists the disks libvirt knows of, for
// store.GCOptions.Disks: the volumes of pools and, with domains, every disk
// of every domain.
func (v *Virsh) Disks(pools []string, domains bool) func(ctx context.Context) ([]string, error) {
	return func(ctx context.Context) ([]string, error) {
		var disks []string
		for _, pool := range pools {
			paths, err := v.PoolPaths(ctx, pool)
			if err != nil {
				return nil, fmt.Errorf("provision: listing pool %s: %w", pool, err)
			}
			disks = append(disks, paths...)
		}
		if !domains {
			return disks, nil
		}
		doms, err := v.Domains(ctx, true)
		if err != nil {
			return nil, fmt.Errorf("provision: listing domains: %w", err)
		}
		for _, d := range doms {
			paths, err := v.DomainDisks(ctx, d)
			if err != nil {
				return nil, fmt.Errorf("provision: listing disks of domain %s: %w", d, err)
			}
			disks = append(disks, paths...)
		}
		return disks, nil
	}
}
