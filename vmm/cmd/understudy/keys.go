package main

import (
	"errors"
	"fmt"
	"io"
	"io/fs"
	"strings"
	"time"

	"github.com/understudy-vmm/understudy/ft"
	"github.com/understudy-vmm/understudy/ft/transport"
)

const keysUsage = `Usage: understudy keys <subcommand> [flags]

Makes the keys and certificates that authenticate the links between nodes.

Subcommands:
  init   create the cluster CA in DIR: ca.crt and ca.key
  issue  issue node NAME a key and certificate signed by the CA: NAME.crt and NAME.key

Nodes need ca.crt and their own NAME.crt and NAME.key; keep ca.key on the machine that issues.
Run "understudy keys <subcommand> --help" for its flags.
`

const maxDays = 100 * 365

func cmdKeys(args []string, stdout, stderr io.Writer) int {
	if len(args) == 0 {
		fmt.Fprint(stderr, keysUsage)
		return exitUsage
	}
	switch args[0] {
	case "init":
		return cmdKeysInit(args[1:], stdout, stderr)
	case "issue":
		return cmdKeysIssue(args[1:], stdout, stderr)
	case "help", "-h", "-help", "--help":
		fmt.Fprint(stdout, keysUsage)
		return 0
	default:
		fmt.Fprintf(stderr, "understudy keys: unknown subcommand %q\nrun 'understudy keys help' for the subcommands\n", args[0])
		return exitUsage
	}
}

// keysFail prints err as one line, with a hint for files that exist.
func keysFail(stderr io.Writer, err error) int {
	if errors.Is(err, fs.ErrExist) {
		fmt.Fprintf(stderr, "understudy: %v (use --force to replace it)\n", err)
	} else {
		fmt.Fprintf(stderr, "understudy: %v\n", err)
	}
	return exitError
}

func checkDays(days int) error {
	if days < 1 || days > maxDays {
		return fmt.Errorf("--days %d: want 1..%d", days, maxDays)
	}
	return nil
}

func cmdKeysInit(args []string, stdout, stderr io.Writer) int {
	fs := newFlags("keys init", "keys init --dir DIR [--name CA-NAME] [--days N] [--force]", stderr)
	dir := fs.String("dir", "", "directory for ca.crt and ca.key (created if missing)")
	name := fs.String("name", "Understudy cluster CA", "the CA certificate's common name")
	days := fs.Int("days", int(transport.DefaultCAValidity/(24*time.Hour)), "days the CA certificate is valid")
	force := fs.Bool("force", false, "replace an existing CA (certificates it issued stop working)")
	if code, done := parseFlags(fs, args); done {
		return code
	}
	if *dir == "" {
		return usageError(fs, "--dir is required")
	}
	if err := checkDays(*days); err != nil {
		return keysFail(stderr, err)
	}
	ca, err := transport.NewCA(*name, time.Duration(*days)*24*time.Hour)
	if err != nil {
		return keysFail(stderr, err)
	}
	if err := transport.WriteCA(*dir, ca, *force); err != nil {
		return keysFail(stderr, err)
	}
	fmt.Fprintf(stdout, "understudy: wrote %s/%s and %s/%s: cluster CA %q, valid until %s\n",
		*dir, transport.CACertFile, *dir, transport.CAKeyFile, ca.Cert.Subject.CommonName, ca.Cert.NotAfter.UTC().Format(time.DateOnly))
	return 0
}

// hostList collects repeated --host flags (comma lists allowed).
type hostList []string

func (h *hostList) String() string { return strings.Join(*h, ",") }
func (h *hostList) Set(v string) error {
	for _, s := range strings.Split(v, ",") {
		if s = strings.TrimSpace(s); s != "" {
			*h = append(*h, s)
		}
	}
	return nil
}

func cmdKeysIssue(args []string, stdout, stderr io.Writer) int {
	fs := newFlags("keys issue", "keys issue --dir DIR --name NAME --role primary|intermediary|backup [--host H...] [--days N] [--force]", stderr)
	dir := fs.String("dir", "", "directory holding the CA; NAME.crt and NAME.key are written there")
	name := fs.String("name", "", "node name: letters, digits, '.', '_', '-' (the certificate's common name)")
	roleArg := fs.String("role", "", "the only role the node may take: primary, intermediary or backup (required)")
	var hosts hostList
	fs.Var(&hosts, "host", "extra DNS name or IP address for the certificate (repeatable; localhost, 127.0.0.1 and NAME are always in)")
	days := fs.Int("days", int(transport.DefaultNodeValidity/(24*time.Hour)), "days the certificate is valid (never past the CA's end)")
	force := fs.Bool("force", false, "replace the node's existing key and certificate")
	if code, done := parseFlags(fs, args); done {
		return code
	}
	if *dir == "" || *name == "" {
		return usageError(fs, "--dir and --name are required")
	}
	if *roleArg == "" {
		// Least privilege: a certificate without a role would be valid
		// for every role.
		return usageError(fs, "--role primary|intermediary|backup is required: a node's certificate names the one role it may take")
	}
	role, err := ft.ParseRole(*roleArg)
	if err != nil {
		return keysFail(stderr, fmt.Errorf("--role: %w", err))
	}
	if err := checkDays(*days); err != nil {
		return keysFail(stderr, err)
	}
	ca, err := transport.LoadCA(*dir)
	if err != nil {
		return keysFail(stderr, err)
	}
	crt, key, err := ca.IssueNode(transport.NodeSpec{Name: *name, Role: role.Wire(), Hosts: hosts, Validity: time.Duration(*days) * 24 * time.Hour})
	if err != nil {
		return keysFail(stderr, err)
	}
	if err := transport.WriteNode(*dir, *name, crt, key, *force); err != nil {
		return keysFail(stderr, err)
	}
	creds, err := transport.LoadCredentials(*dir, *name)
	if err != nil {
		return keysFail(stderr, err)
	}
	certPath, keyPath := transport.NodeFiles(*dir, *name)
	fmt.Fprintf(stdout, "understudy: wrote %s and %s: node %q (%s), valid until %s\n",
		certPath, keyPath, *name, role, creds.Certificate().NotAfter.UTC().Format(time.DateOnly))
	return 0
}
