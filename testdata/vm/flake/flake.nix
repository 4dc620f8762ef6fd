{
  # A flake with a NixOS configuration for `nixvm-image build --flake` tests
  # (cmd/nixvm-image TestBuildFlake copies it into a git repository).
  # nixosConfigurations come from the fake nixpkgs (../../nixpkgs, found
  # through NIXVM_FAKE_NIXPKGS: nixvm-image evaluates flakes with --impure).
  description = "nixvm-image test flake";
  outputs = { self }:
    let eval = import (/. + builtins.getEnv "NIXVM_FAKE_NIXPKGS" + "/nixos/eval-config.nix"); in
    {
      nixosConfigurations.baseline = eval [ ./configuration.nix ];
    };
}
