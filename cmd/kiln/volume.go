package main

import (
	"fmt"
	"strings"

	"github.com/spf13/cobra"

	"github.com/kiln-dev/kiln/internal/guest/proto"
	"github.com/kiln-dev/kiln/internal/vm"
)

// volumeFlags is the repeatable --volume HOST:GUEST[:ro|:rw] flag of run
// and invoke (not -v, which is --verbose).
type volumeFlags []vm.Volume

func (f *volumeFlags) String() string {
	s := make([]string, len(*f))
	for i, v := range *f {
		s[i] = v.String()
	}
	return strings.Join(s, ",")
}

// Set parses one --volume (vm.ParseVolume: HOST must be a directory).
func (f *volumeFlags) Set(s string) error {
	v, err := vm.ParseVolume(s)
	if err != nil {
		return err
	}
	*f = append(*f, v)
	return nil
}

func (f *volumeFlags) Type() string { return "HOST:GUEST[:ro|:rw]" }

func (f *volumeFlags) add(cmd *cobra.Command) {
	cmd.Flags().Var(f, "volume", fmt.Sprintf("share the host directory HOST at GUEST in the guest, read-only unless :rw; repeatable, up to %d (kiln's kernel only)", proto.VolumeSlots))
}
