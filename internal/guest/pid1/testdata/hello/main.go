// Command hello is the guest program of pid1's boot test: it prints what it sees and exits 3.
package main

import (
	"fmt"
	"os"
	"strings"
)

func main() {
	if len(os.Args) > 1 && os.Args[1] == "--port" {
		f, err := os.OpenFile(os.Args[2], os.O_RDWR, 0)
		if err == nil {
			f.Close()
		}
		fmt.Printf("agent args=%s\nport open=%v\n", strings.Join(os.Args[1:], " "), err == nil)
		os.Exit(0)
	}
	h, _ := os.Hostname()
	wd, _ := os.Getwd()
	err := os.WriteFile("/tmp/x", []byte("x"), 0o644)
	fmt.Printf("hello host=%s home=%s foo=%s cwd=%s tmpwrite=%v\n", h, os.Getenv("HOME"), os.Getenv("FOO"), wd, err == nil)
	fmt.Fprintln(os.Stderr, "to stderr")
	os.Exit(3)
}
