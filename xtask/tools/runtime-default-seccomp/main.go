// Prints the seccomp profile containerd gives a container by default
// (RuntimeDefault in Kubernetes), for a container granted the Linux
// capabilities named in the first argument (comma-separated, without the
// CAP_ prefix, as a manifest writes them). The tests run the agent under
// it, with those capabilities, as the DaemonSet runs it.
package main

import (
	"encoding/json"
	"fmt"
	"os"
	"strings"

	"github.com/containerd/containerd/v2/contrib/seccomp"
	specs "github.com/opencontainers/runtime-spec/specs-go"
)

func main() {
	if len(os.Args) != 2 {
		fmt.Fprintln(os.Stderr, "usage: runtime-default-seccomp BPF,NET_ADMIN,...")
		os.Exit(2)
	}
	var caps []string
	for _, name := range strings.Split(os.Args[1], ",") {
		caps = append(caps, "CAP_"+strings.ToUpper(strings.TrimSpace(name)))
	}
	spec := &specs.Spec{Process: &specs.Process{Capabilities: &specs.LinuxCapabilities{
		Bounding:  caps,
		Effective: caps,
		Permitted: caps,
	}}}
	if err := json.NewEncoder(os.Stdout).Encode(seccomp.DefaultProfile(spec)); err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
}
