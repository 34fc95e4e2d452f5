package main

import (
	"fmt"
	"strings"
	"text/tabwriter"

	"github.com/spf13/cobra"

	"github.com/kiln-dev/kiln/internal/image"
	"github.com/kiln-dev/kiln/internal/size"
	"github.com/kiln-dev/kiln/internal/vm"
)

func newInspectCmd(a *app) *cobra.Command {
	var asJSON, verify bool
	cmd := &cobra.Command{
		Use:     "inspect IMAGE",
		Short:   "Print an image's manifest: python, packages, kernel (kind, version, config digest), parts and digests",
		Example: "  kiln inspect numpy.kimg\n  kiln inspect numpy.kimg --json | jq '.manifest.distributions'",
		Args:    cobra.ExactArgs(1),
		RunE: func(cmd *cobra.Command, args []string) error {
			img, err := image.Open(args[0])
			if err != nil {
				return err
			}
			if verify {
				if err := img.Verify(); err != nil {
					return err
				}
			}
			if asJSON {
				return a.printJSON(map[string]any{"path": img.Path, "digest": img.Digest, "size": img.Size, "parts": img.Parts, "manifest": img.Manifest,
					"kernel": map[string]string{"kind": img.Manifest.KernelKind(), "version": img.Manifest.Kernel.Version, "config_digest": img.Manifest.Kernel.ConfigDigest, "machine": vm.MachineFor(img.Manifest)}})
			}
			m := img.Manifest
			w := tabwriter.NewWriter(a.stdout, 0, 4, 2, ' ', 0)
			fmt.Fprintf(w, "image\t%s\n", img.Path)
			fmt.Fprintf(w, "name\t%s\n", m.Name)
			fmt.Fprintf(w, "digest\tsha256:%s\n", img.Digest)
			fmt.Fprintf(w, "size\t%s\n", size.Format(img.Size))
			fmt.Fprintf(w, "python\t%s (%s)\n", m.Python.Version, m.Python.Executable)
			kern := m.KernelKind() + " " + m.Kernel.Version
			if m.Kernel.Package != "" {
				kern += " (" + m.Kernel.Package + " " + m.Kernel.PackageVersion + ")"
			}
			fmt.Fprintf(w, "kernel\t%s\n", kern)
			if m.Kernel.ConfigDigest != "" {
				fmt.Fprintf(w, "kernel config\tsha256:%s\n", m.Kernel.ConfigDigest)
			}
			if len(m.Kernel.Modules) > 0 {
				fmt.Fprintf(w, "kernel modules\t%s\n", strings.Join(m.Kernel.Modules, ","))
			} else {
				fmt.Fprintf(w, "kernel modules\tnone (all built in)\n")
			}
			fmt.Fprintf(w, "rootfs\t%s/%s, %d files, %s uncompressed\n", m.Rootfs.Filesystem, m.Rootfs.Compression, m.Rootfs.Files, size.Format(m.Rootfs.TreeBytes))
			fmt.Fprintf(w, "vm\t%d MiB, %d vcpus, %s machine\n", m.MemoryMiB, m.VCPUs, vm.MachineFor(m))
			if len(m.Command) > 0 {
				fmt.Fprintf(w, "command\t%s\n", strings.Join(m.Command, " "))
			}
			if len(m.Preload) > 0 {
				fmt.Fprintf(w, "preload\t%s\n", strings.Join(m.Preload, ", "))
			}
			fmt.Fprintln(w, "\nPART\tOFFSET\tSIZE\tSHA256")
			for _, p := range img.Parts {
				fmt.Fprintf(w, "%s\t%d\t%s\t%s\n", p.Name, p.Offset, size.Format(p.Size), p.SHA256)
			}
			fmt.Fprintln(w, "\nDISTRIBUTION\tVERSION\tSOURCE")
			for _, d := range m.Distributions {
				fmt.Fprintf(w, "%s\t%s\t%s\n", d.Name, d.Version, d.Source)
			}
			return w.Flush()
		},
	}
	cmd.Flags().BoolVar(&asJSON, "json", false, "print JSON")
	cmd.Flags().BoolVar(&verify, "verify", false, "also check every part's sha256")
	return cmd
}
